//! `chat`: LAN messaging over UDP (the protocol and node are being built).
use clap::Parser;

/// LAN messaging over UDP between chat instances and plain UDP peers.
#[derive(Parser, Debug)]
#[command(name = "chat", version)]
struct Args {
    /// UDP port to bind.
    #[arg(long, default_value_t = 7890)]
    port: u16,
}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("chat: messaging is not implemented yet; only --help and --version work")
}
