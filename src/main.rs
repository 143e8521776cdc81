fn main() -> std::process::ExitCode {
    callseal::cli::main()
}
