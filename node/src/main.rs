//! `coterie`: the command-line interface to a Coterie profile and node.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
