//! What a typed line means: a command, or text to send.

/// One typed line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `/send NICK|HOST[:PORT] PATH...`: offer files (paths may be "quoted").
    Send {
        to: String,
        paths: Vec<String>,
    },
    /// `/files`: offers either way.
    Files,
    /// `/get ID [DIR]`.
    Get {
        id: u32,
        dir: Option<String>,
    },
    /// `/decline ID`.
    Decline(u32),
    /// `/withdraw OFFER` (the offer's number as `/files` shows it).
    Withdraw(u64),
    /// A blank line.
    Nothing,
    Quit,
    Help,
    /// `/to HOST:PORT`, or `/to` alone for every peer again.
    To(Option<&'a str>),
    Nick(&'a str),
    Who,
    Stats,
    /// `/away [TEXT]`: absent, for IP Messenger users.
    Away(Option<&'a str>),
    Back,
    /// To every known peer.
    All(&'a str),
    /// A private message to the peer(s) with this nickname.
    Msg {
        nick: &'a str,
        text: &'a str,
    },
    /// Text for the current destination.
    Say(&'a str),
    /// A command used wrongly: how to use it.
    Usage(&'static str),
    Unknown(&'a str),
}

pub const HELP: &str = "commands: /to HOST:PORT (destination; /to HOST: an IP Messenger user; /to alone: every peer), /msg NICK text or @NICK text, /all text, /who, /stats, /nick NAME, /away [TEXT], /back, /send NICK|HOST:PORT PATH..., /files, /get ID [DIR], /decline ID, /withdraw OFFER, /help, /quit; a line starting with // sends one starting with /";

/// Words of `rest`, a word in double quotes keeping its spaces (`\"` is a quote).
fn words(rest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return out;
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' if chars.peek() == Some(&'"') => word.push(chars.next().unwrap_or('"')),
                    c => word.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        out.push(word);
    }
}

/// An offer number as typed: `3` or `#3`.
fn offer_id(text: &str) -> Option<u32> {
    text.trim().trim_start_matches('#').parse().ok()
}

fn private<'a>(rest: &'a str, usage: &'static str) -> Command<'a> {
    match rest.split_once(' ') {
        Some((nick, text)) if !nick.is_empty() => Command::Msg { nick, text },
        _ => Command::Usage(usage),
    }
}

pub fn parse(line: &str) -> Command<'_> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Command::Nothing;
    }
    let (cmd, rest) = match line.split_once(' ') {
        Some((c, r)) => (c, r.trim_start()),
        None => (line, ""),
    };
    match cmd {
        "/quit" | "/exit" => Command::Quit,
        "/help" => Command::Help,
        "/to" if rest.is_empty() => Command::To(None),
        "/to" => Command::To(Some(rest.trim())),
        "/nick" if rest.trim().is_empty() => Command::Usage("usage: /nick NAME"),
        "/nick" => Command::Nick(rest.trim()),
        "/who" => Command::Who,
        "/stats" => Command::Stats,
        "/away" if rest.trim().is_empty() => Command::Away(None),
        "/away" => Command::Away(Some(rest.trim())),
        "/back" => Command::Back,
        "/files" => Command::Files,
        "/send" => match words(rest).split_first() {
            Some((to, paths)) if !paths.is_empty() => Command::Send {
                to: to.clone(),
                paths: paths.to_vec(),
            },
            _ => Command::Usage("usage: /send NICK|HOST:PORT PATH..."),
        },
        "/get" => {
            let w = words(rest);
            match (w.first().and_then(|i| offer_id(i)), w.len()) {
                (Some(id), 1) => Command::Get { id, dir: None },
                (Some(id), 2) => Command::Get {
                    id,
                    dir: Some(w[1].clone()),
                },
                _ => Command::Usage("usage: /get ID [DIR]"),
            }
        }
        "/decline" => match offer_id(rest) {
            Some(id) => Command::Decline(id),
            None => Command::Usage("usage: /decline ID"),
        },
        "/withdraw" => match u64::from_str_radix(rest.trim(), 16) {
            Ok(offer) => Command::Withdraw(offer),
            Err(_) => Command::Usage("usage: /withdraw OFFER (as /files shows it)"),
        },
        "/all" => Command::All(rest),
        "/msg" => private(rest, "usage: /msg NICK text"),
        _ if line.starts_with('@') => private(&line[1..], "usage: @NICK text"),
        _ if line.starts_with("//") => Command::Say(&line[1..]),
        _ if line.starts_with('/') => Command::Unknown(cmd),
        _ => Command::Say(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_commands() {
        assert_eq!(parse("  \r\n"), Command::Nothing);
        assert_eq!(parse("hello there"), Command::Say("hello there"));
        assert_eq!(parse("//etc/passwd"), Command::Say("/etc/passwd"));
        assert_eq!(
            parse("/to 10.0.0.1:7890"),
            Command::To(Some("10.0.0.1:7890"))
        );
        assert_eq!(parse("/to"), Command::To(None));
        assert_eq!(
            parse("@bob lunch?"),
            Command::Msg {
                nick: "bob",
                text: "lunch?"
            }
        );
        assert_eq!(
            parse("/msg bob  hi"),
            Command::Msg {
                nick: "bob",
                text: " hi"
            }
        );
        assert_eq!(parse("/msg bob"), Command::Usage("usage: /msg NICK text"));
        assert_eq!(parse("@"), Command::Usage("usage: @NICK text"));
        assert_eq!(parse("/nick"), Command::Usage("usage: /nick NAME"));
        assert_eq!(parse("/all hi all"), Command::All("hi all"));
        assert_eq!(parse("/frob x"), Command::Unknown("/frob"));
        assert_eq!(parse("/quit\r"), Command::Quit);
        assert_eq!(parse("/away"), Command::Away(None));
        assert_eq!(parse("/away  at lunch "), Command::Away(Some("at lunch")));
        assert_eq!(parse("/back"), Command::Back);
        assert_eq!(
            parse(r#"/send "chat 你好" a.txt "my file.pdf" b\"c"#),
            Command::Send {
                to: "chat 你好".into(),
                paths: vec!["a.txt".into(), "my file.pdf".into(), "b\\\"c".into()]
            }
        );
        assert_eq!(
            parse("/send bob"),
            Command::Usage("usage: /send NICK|HOST:PORT PATH...")
        );
        assert_eq!(parse("/get #3"), Command::Get { id: 3, dir: None });
        assert_eq!(
            parse(r#"/get 3 "/tmp/in box""#),
            Command::Get {
                id: 3,
                dir: Some("/tmp/in box".into())
            }
        );
        assert_eq!(parse("/get x"), Command::Usage("usage: /get ID [DIR]"));
        assert_eq!(parse("/decline 2"), Command::Decline(2));
        assert_eq!(parse("/withdraw a1b2"), Command::Withdraw(0xa1b2));
        assert_eq!(parse("/files"), Command::Files);
    }
}
