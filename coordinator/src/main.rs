fn main() {
    if let Err(error) = davit_coordinator::cli::main() {
        // `{:#}` prints the whole chain of causes on one line, without a backtrace: these are
        // messages for operators, each saying what to fix.
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
