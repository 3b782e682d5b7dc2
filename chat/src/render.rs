//! How events and replies look: one line of text for a terminal or a pipe, or one JSON
//! object per event with `--json`. Everything received is escaped here, by the one
//! definition in `corokit_common::text`.

use std::net::SocketAddr;

use corokit_common::text::{escape, json_line};
use serde_json::json;

use crate::core::{Event, PeerInfo, Protocol};

/// The time of day shown with each line.
pub fn clock() -> String {
    chrono::Local::now().format("%H:%M:%S").to_string()
}

fn who(nick: Option<&str>, addr: SocketAddr) -> String {
    match nick {
        Some(n) => format!("{} ({addr})", escape(n)),
        None => addr.to_string(),
    }
}

/// A line for a person; `None` for events nobody needs to read.
pub fn text(event: &Event, clock: &str) -> Option<String> {
    Some(match event {
        Event::Message { from, nick, text } => {
            format!(
                "[{clock}] {}: {}",
                who(nick.as_deref(), *from),
                escape(text)
            )
        }
        Event::Join { addr, nick } => format!("[{clock}] * {} joined", who(Some(nick), *addr)),
        Event::Leave {
            addr,
            nick,
            expired,
        } => format!(
            "[{clock}] * {} {}",
            who(Some(nick), *addr),
            if *expired { "went silent" } else { "left" }
        ),
        Event::NotDelivered { to, nick, text, .. } => format!(
            "[{clock}] ! not delivered to {}: {}",
            who(nick.as_deref(), *to),
            escape(&text.chars().take(60).collect::<String>())
        ),
        Event::Refused { to, why } => {
            format!("[{clock}] ! {to} refused us: {}", why.describe())
        }
        Event::Unreachable { to } => format!("[{clock}] ! nothing is listening at {to}"),
        Event::Notice(text) => format!("[{clock}] ! {}", escape(text)),
        Event::Delivered { .. } => return None,
    })
}

/// A JSON line for a program; `None` for events nobody needs to read.
pub fn json(event: &Event, clock: &str) -> Option<String> {
    let value = match event {
        Event::Message { from, nick, text } => json!({
            "event": "message", "time": clock, "from": from.to_string(), "nick": nick,
            "text": text,
            "protocol": if nick.is_some() { "chat" } else { "plain" } }),
        Event::Join { addr, nick } => json!({
            "event": "join", "time": clock, "from": addr.to_string(), "nick": nick,
            "protocol": "chat" }),
        Event::Leave {
            addr,
            nick,
            expired,
        } => json!({
            "event": "leave", "time": clock, "from": addr.to_string(), "nick": nick,
            "expired": expired }),
        Event::NotDelivered { to, nick, text, .. } => json!({
            "event": "not_delivered", "time": clock, "to": to.to_string(), "nick": nick,
            "text": text }),
        Event::Refused { to, why } => json!({
            "event": "refused", "time": clock, "to": to.to_string(), "reason": why.describe() }),
        Event::Unreachable { to } => {
            json!({ "event": "unreachable", "time": clock, "to": to.to_string() })
        }
        Event::Notice(text) => json!({ "event": "notice", "time": clock, "text": text }),
        Event::Delivered { .. } => return None,
    };
    Some(json_line(&value))
}

/// The `listening` event that starts `--json` output.
pub fn listening(addr: SocketAddr, nick: &str, clock: &str) -> String {
    json_line(
        &json!({ "event": "listening", "time": clock, "addr": addr.to_string(), "nick": nick }),
    )
}

/// `/who`: a line per peer.
pub fn who_lines(peers: &[PeerInfo]) -> Vec<String> {
    if peers.is_empty() {
        return vec!["chat: no peers yet".into()];
    }
    peers
        .iter()
        .map(|p| {
            let also: String = p.also.iter().map(|a| format!(", also at {a}")).collect();
            format!(
                "  {:<24} {:<22} {:<5} last seen {:.0?} ago{also}",
                escape(p.nick.as_deref().unwrap_or("-")),
                p.addr.to_string(),
                match p.protocol {
                    Protocol::Chat => "chat",
                    Protocol::Plain => "plain",
                },
                p.last_seen
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:7890".parse().unwrap()
    }

    #[test]
    fn received_text_and_nicknames_are_escaped() {
        let e = Event::Message {
            from: addr(),
            nick: Some("eve\u{202e}".into()),
            text: "hi\x1b[2J\u{2028}\u{e0041}".into(),
        };
        assert_eq!(
            text(&e, "12:00:00").unwrap(),
            "[12:00:00] eve\\u{202e} (127.0.0.1:7890): hi\\u{1b}[2J\\u{2028}\\u{e0041}"
        );
        let line = json(&e, "12:00:00").unwrap();
        assert!(
            line.contains(r#""text":"hi\u001b[2J\u2028\udb40\udc41""#),
            "{line}"
        );
        assert!(line.contains(r#""nick":"eve\u202e""#), "{line}");
        let notice = Event::Notice("from \u{9b}".into());
        assert!(json(&notice, "t").unwrap().contains(r"\u009b"));
    }

    #[test]
    fn delivery_reports_are_not_shown() {
        assert_eq!(text(&Event::Delivered { to: addr(), id: 1 }, "t"), None);
        assert_eq!(json(&Event::Delivered { to: addr(), id: 1 }, "t"), None);
    }

    #[test]
    fn who_lists_aliases_and_protocols() {
        let peers = [PeerInfo {
            addr: addr(),
            also: vec!["[::1]:7890".parse().unwrap()],
            nick: Some("ana".into()),
            protocol: Protocol::Chat,
            last_seen: std::time::Duration::from_secs(3),
        }];
        let lines = who_lines(&peers);
        assert!(lines[0].contains("ana") && lines[0].contains("chat"));
        assert!(lines[0].ends_with("also at [::1]:7890"), "{}", lines[0]);
        assert_eq!(who_lines(&[]), ["chat: no peers yet"]);
    }
}
