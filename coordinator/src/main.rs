fn main() {
    return_large_allocations_to_the_system();
    if let Err(error) = davit_coordinator::cli::main() {
        // `{:#}` prints the whole chain of causes on one line, without a backtrace: these are
        // messages for operators, each saying what to fix.
        eprintln!("error: {error:#}");
        std::process::exit(davit_coordinator::cli::failure::exit_status_of(&error));
    }
}

/// glibc serves a freed allocation's memory again from its heap instead of returning it, and
/// after the first large free it raises its mmap threshold (up to 32 MiB), so one 19 MiB
/// password hash (argon2id) per thread would stay resident for the life of the node. A fixed
/// threshold keeps every allocation of 4 MiB or more in its own mapping, unmapped when freed.
fn return_large_allocations_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}
