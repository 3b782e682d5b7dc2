//! How events and replies look: one line of text for a terminal or a pipe, or one JSON
//! object per event with `--json`. Everything received is escaped here, by the one
//! definition in `corokit_common::text`.

use std::net::SocketAddr;

use corokit_common::text::{escape, json_line};
use serde_json::json;

use crate::core::{Event, IpmsgUser, PeerInfo, Protocol};
use crate::transfer::offer::OfferedFile;
use crate::transfer::Happening;

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

/// A peer with what kind it is, for IP Messenger users: `nick (addr, IPMsg)`.
fn who_by(nick: Option<&str>, addr: SocketAddr, protocol: Protocol) -> String {
    match (protocol, nick) {
        (Protocol::Ipmsg { unauthenticated }, Some(n)) => format!(
            "{} ({addr}, IPMsg{})",
            escape(n),
            if unauthenticated {
                ", unauthenticated"
            } else {
                ""
            }
        ),
        _ => who(nick, addr),
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Chat => "chat",
        Protocol::Plain => "plain",
        Protocol::Ipmsg { .. } => "ipmsg",
    }
}

/// `, iptux, group G, away`: what /who and a join say of an IP Messenger user.
fn ipmsg_details(u: &IpmsgUser) -> String {
    let mut out = format!(", {}", u.client.name());
    if !u.group.is_empty() {
        out += &format!(", group {}", escape(&u.group));
    }
    if !u.host.is_empty() {
        out += &format!(", host {}", escape(&u.host));
    }
    if u.away {
        out += ", away";
    }
    out
}

/// A line for a person; `None` for events nobody needs to read.
pub fn text(event: &Event, clock: &str) -> Option<String> {
    Some(match event {
        Event::Message {
            from,
            nick,
            text,
            protocol,
        } => {
            format!(
                "[{clock}] {}: {}",
                who_by(nick.as_deref(), *from, *protocol),
                escape(text)
            )
        }
        Event::Join {
            addr,
            nick,
            protocol,
            ipmsg,
        } => format!(
            "[{clock}] * {}{} joined",
            who_by(Some(nick), *addr, *protocol),
            ipmsg.as_ref().map(ipmsg_details).unwrap_or_default()
        ),
        Event::Away {
            addr,
            nick,
            away,
            protocol,
        } => format!(
            "[{clock}] * {} is {}",
            who_by(Some(nick), *addr, *protocol),
            if *away { "away" } else { "back" }
        ),
        Event::Leave {
            addr,
            nick,
            expired,
            protocol,
        } => format!(
            "[{clock}] * {} {}",
            who_by(Some(nick), *addr, *protocol),
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
        // Told as what the transfers make of them (see `happening_text`).
        Event::Delivered { .. }
        | Event::FileOffer { .. }
        | Event::OfferDeclined { .. }
        | Event::OfferWithdrawn { .. } => return None,
    })
}

/// A JSON line for a program; `None` for events nobody needs to read.
pub fn json(event: &Event, clock: &str) -> Option<String> {
    let value = match event {
        Event::Message {
            from,
            nick,
            text,
            protocol,
        } => marked(
            json!({
            "event": "message", "time": clock, "from": from.to_string(), "nick": nick,
            "text": text, "protocol": protocol_name(*protocol) }),
            *protocol,
        ),
        Event::Join {
            addr,
            nick,
            protocol,
            ipmsg,
        } => {
            let mut v = json!({
                "event": "join", "time": clock, "from": addr.to_string(), "nick": nick,
                "protocol": protocol_name(*protocol) });
            if let Some(u) = ipmsg {
                v["user"] = json!(u.user);
                v["host"] = json!(u.host);
                v["group"] = json!(u.group);
                v["client"] = json!(u.client.name());
                v["version"] = json!(u.version);
                v["away"] = json!(u.away);
            }
            marked(v, *protocol)
        }
        Event::Away {
            addr,
            nick,
            away,
            protocol,
        } => marked(
            json!({
            "event": "away", "time": clock, "from": addr.to_string(), "nick": nick,
            "away": away, "protocol": protocol_name(*protocol) }),
            *protocol,
        ),
        Event::Leave {
            addr,
            nick,
            expired,
            protocol,
        } => marked(
            json!({
            "event": "leave", "time": clock, "from": addr.to_string(), "nick": nick,
            "expired": expired, "protocol": protocol_name(*protocol) }),
            *protocol,
        ),
        Event::NotDelivered { to, nick, text, .. } => json!({
            "event": "not_delivered", "time": clock, "to": to.to_string(), "nick": nick,
            "text": text }),
        Event::Refused { to, why } => json!({
            "event": "refused", "time": clock, "to": to.to_string(), "reason": why.describe() }),
        Event::Unreachable { to } => {
            json!({ "event": "unreachable", "time": clock, "to": to.to_string() })
        }
        Event::Notice(text) => json!({ "event": "notice", "time": clock, "text": text }),
        Event::Delivered { .. }
        | Event::FileOffer { .. }
        | Event::OfferDeclined { .. }
        | Event::OfferWithdrawn { .. } => return None,
    };
    Some(json_line(&value))
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

fn file_list(files: &[OfferedFile]) -> String {
    files
        .iter()
        .map(|f| match f.is_dir() {
            true => format!("{}/ (directory)", escape(&f.name)),
            false => format!("{} ({})", escape(&f.name), size(f.size)),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A line about files for a person.
pub fn happening_text(h: &Happening, clock: &str) -> String {
    match h {
        Happening::Offered {
            id,
            from,
            nick,
            protocol,
            text,
            files,
        } => {
            let said = if text.is_empty() {
                String::new()
            } else {
                format!(": {}", escape(text))
            };
            format!(
                "[{clock}] ↓ #{id} {} offers {}{said} (/get {id}, /decline {id})",
                who_by(nick.as_deref(), *from, *protocol),
                file_list(files)
            )
        }
        Happening::Progress {
            id,
            name,
            bytes,
            size: total,
        } => format!(
            "[{clock}] ↓ #{id} {}: {} of {} ({}%)",
            escape(name),
            size(*bytes),
            size(*total),
            if *total == 0 {
                100
            } else {
                bytes * 100 / total
            }
        ),
        Happening::Done { id, name, path, .. } => format!(
            "[{clock}] ↓ #{id} {} saved as {}",
            escape(name),
            escape(&path.to_string_lossy())
        ),
        Happening::Failed { id, name, error } => {
            format!("[{clock}] ! #{id} {}: {}", escape(name), escape(error))
        }
        Happening::Served { to, name, all, .. } => format!(
            "[{clock}] ↑ {to} has {}{}",
            escape(name),
            if *all {
                " (every file of the offer)"
            } else {
                ""
            }
        ),
        Happening::Declined { from, .. } => format!("[{clock}] ! {from} declined the files"),
        Happening::Withdrawn { id, from } => {
            format!("[{clock}] ! {from} withdrew offer #{id}")
        }
    }
}

/// A JSON line about files for a program.
pub fn happening_json(h: &Happening, clock: &str) -> String {
    let files = |files: &[OfferedFile]| -> Vec<serde_json::Value> {
        files
            .iter()
            .map(|f| json!({ "name": f.name, "size": f.size, "directory": f.is_dir() }))
            .collect()
    };
    let value = match h {
        Happening::Offered {
            id,
            from,
            nick,
            protocol,
            text,
            files: offered,
        } => marked(
            json!({ "event": "file_offer", "time": clock, "id": id, "from": from.to_string(),
                "nick": nick, "protocol": protocol_name(*protocol), "text": text,
                "files": files(offered) }),
            *protocol,
        ),
        Happening::Progress {
            id,
            name,
            bytes,
            size,
        } => json!({ "event": "file_progress", "time": clock, "id": id, "name": name,
            "bytes": bytes, "size": size }),
        Happening::Done {
            id,
            name,
            path,
            size,
            fetched,
        } => json!({ "event": "file_done", "time": clock, "id": id, "name": name,
            "path": path.to_string_lossy(), "size": size, "fetched": fetched }),
        Happening::Failed { id, name, error } => json!({ "event": "file_failed", "time": clock,
            "id": id, "name": name, "error": error }),
        Happening::Served {
            packet,
            to,
            name,
            all,
        } => json!({ "event": "file_sent", "time": clock, "offer": format!("{packet:x}"),
            "to": to.to_string(), "name": name, "all": all }),
        Happening::Declined { packet, from } => json!({ "event": "file_declined", "time": clock,
            "offer": format!("{packet:x}"), "from": from.to_string() }),
        Happening::Withdrawn { id, from } => json!({ "event": "file_withdrawn", "time": clock,
            "id": id, "from": from.to_string() }),
    };
    json_line(&value)
}

/// `"unauthenticated": true` on what an IP Messenger peer did, where this chat has a key.
fn marked(mut v: serde_json::Value, protocol: Protocol) -> serde_json::Value {
    if protocol
        == (Protocol::Ipmsg {
            unauthenticated: true,
        })
    {
        v["unauthenticated"] = json!(true);
    }
    v
}

/// The `listening` event that starts `--json` output.
pub fn listening(addr: SocketAddr, ipmsg: Option<SocketAddr>, nick: &str, clock: &str) -> String {
    json_line(&json!({
        "event": "listening", "time": clock, "addr": addr.to_string(), "nick": nick,
        "ipmsg": ipmsg.map(|a| a.to_string()) }))
}

/// `/who`: a line per peer.
pub fn who_lines(peers: &[PeerInfo]) -> Vec<String> {
    if peers.is_empty() {
        return vec!["chat: no peers yet".into()];
    }
    peers
        .iter()
        .map(|p| {
            let mut also: String = p.also.iter().map(|a| format!(", also at {a}")).collect();
            if let Some(u) = &p.ipmsg {
                also += &ipmsg_details(u);
            }
            if p.protocol
                == (Protocol::Ipmsg {
                    unauthenticated: true,
                })
            {
                also += ", unauthenticated";
            }
            format!(
                "  {:<24} {:<22} {:<5} last seen {:.0?} ago{also}",
                escape(p.nick.as_deref().unwrap_or("-")),
                p.addr.to_string(),
                protocol_name(p.protocol),
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
            protocol: Protocol::Chat,
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
    fn ipmsg_users_are_shown_with_their_client_and_marked_under_a_key() {
        let addr: SocketAddr = "10.0.0.5:2425".parse().unwrap();
        let user = IpmsgUser {
            user: "root".into(),
            host: "vm".into(),
            group: "grp\u{1b}".into(),
            client: crate::ipmsg::Client::Iptux,
            version: "1_iptux 0.8.3".into(),
            away: true,
        };
        let join = |unauthenticated| Event::Join {
            addr,
            nick: "tux".into(),
            protocol: Protocol::Ipmsg { unauthenticated },
            ipmsg: Some(user.clone()),
        };
        assert_eq!(
            text(&join(false), "t").unwrap(),
            "[t] * tux (10.0.0.5:2425, IPMsg), iptux, group grp\\u{1b}, host vm, away joined"
        );
        let line = json(&join(true), "t").unwrap();
        for part in [
            r#""protocol":"ipmsg""#,
            r#""client":"iptux""#,
            r#""group":"grp\u001b""#,
            r#""unauthenticated":true"#,
        ] {
            assert!(line.contains(part), "{line}");
        }
        let message = Event::Message {
            from: addr,
            nick: Some("tux".into()),
            text: "hi".into(),
            protocol: Protocol::Ipmsg {
                unauthenticated: true,
            },
        };
        assert_eq!(
            text(&message, "t").unwrap(),
            "[t] tux (10.0.0.5:2425, IPMsg, unauthenticated): hi"
        );
        assert!(!json(&join(false), "t").unwrap().contains("unauthenticated"));
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
            ipmsg: None,
        }];
        let lines = who_lines(&peers);
        assert!(lines[0].contains("ana") && lines[0].contains("chat"));
        assert!(lines[0].ends_with("also at [::1]:7890"), "{}", lines[0]);
        assert_eq!(who_lines(&[]), ["chat: no peers yet"]);
    }
}
