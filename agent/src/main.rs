fn main() {
    eprintln!("davit-agent {}: the job loop arrives with agent registration (see ARCHITECTURE.md)", env!("CARGO_PKG_VERSION"));
    std::process::exit(2);
}
