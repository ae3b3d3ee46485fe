fn main() -> anyhow::Result<()> {
    davit_coordinator::cli::main()
}
