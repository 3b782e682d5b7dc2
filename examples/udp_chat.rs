//! The minimal two-coroutine UDP chat: one coroutine sends each line you type to the peer,
//! the other prints what arrives as `>>>(ip, port):text`, like the classic Python script.
//!
//! `cargo run --example udp_chat -- 127.0.0.1:7890 127.0.0.1:7891` in one terminal and
//! `cargo run --example udp_chat -- 127.0.0.1:7891 127.0.0.1:7890` in another.

use std::net::SocketAddr;
use std::sync::Arc;

use may::net::UdpSocket;

fn main() {
    corokit_common::init();
    let mut args = std::env::args().skip(1);
    let parse = |arg: Option<String>, default: &str| -> SocketAddr {
        let text = arg.unwrap_or_else(|| default.to_string());
        text.parse().unwrap_or_else(|_| {
            eprintln!("udp_chat: {text:?} is not an address like 127.0.0.1:7890");
            std::process::exit(2)
        })
    };
    let local = parse(args.next(), "127.0.0.1:7890");
    let peer = parse(args.next(), "127.0.0.1:7891");
    let socket = match UdpSocket::bind(local) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("udp_chat: cannot bind {local}: {e}");
            std::process::exit(1)
        }
    };
    println!("listening on {local}, sending to {peer}; type a line and press Enter");

    let receiver = {
        let socket = socket.clone();
        corokit_common::spawn(move || {
            // The largest UDP payload: a smaller buffer silently truncates.
            let mut buf = vec![0u8; 65_507];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                // Never print raw network bytes: escape control and invisible characters.
                let text = corokit_common::text::escape_bytes(&buf[..n]);
                println!(">>>({}, {}):{}", from.ip(), from.port(), text);
            }
        })
    };
    let mut lines = corokit_common::stdin::lines();
    while let Some(Ok(line)) = lines.recv() {
        if let Err(e) = socket.send_to(line.as_bytes(), peer) {
            eprintln!("udp_chat: sending to {peer}: {e}");
        }
    }
    // Input ended: keep showing what arrives until Ctrl-C.
    if let Ok(receiver) = receiver {
        let _ = receiver.join();
    }
}
