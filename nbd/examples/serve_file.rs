//! Serves one file as an NBD export until SIGINT/SIGTERM (used by `benches/nbd.sh`).
//!
//! ```sh
//! cargo run --release -p haven-nbd --example serve_file -- IMAGE NAME SOCKET [--read-only] [--tcp ADDR]
//! qemu-io -f raw 'nbd+unix:///NAME?socket=SOCKET' -c 'read 0 1M'
//! ```
//! Prints `ready` on stdout once it accepts connections.
use std::sync::Arc;

use haven_nbd::{Exports, FileBackend, Server};

fn usage() -> ! {
    eprintln!("usage: serve_file IMAGE NAME SOCKET [--read-only] [--tcp ADDR]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let (Some(image), Some(name), Some(socket)) = (args.next(), args.next(), args.next()) else {
        usage()
    };
    let mut read_only = false;
    let mut tcp = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--read-only" => read_only = true,
            "--tcp" => tcp = Some(args.next().unwrap_or_else(|| usage()).parse()?),
            _ => usage(),
        }
    }
    let exports = Arc::new(Exports::new());
    exports.insert(name, Arc::new(FileBackend::open(&image, read_only)?));
    let server = Server::new(exports);
    let unix = server.serve_unix(&socket).await?;
    let tcp = match tcp {
        Some(addr) => Some(server.serve_tcp(addr).await?),
        None => None,
    };
    if let Some(tcp) = &tcp {
        eprintln!("listening on {}", tcp.tcp_addr().expect("tcp"));
    }
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    unix.shutdown().await;
    if let Some(tcp) = tcp {
        tcp.shutdown().await;
    }
    Ok(())
}
