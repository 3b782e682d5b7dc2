//! What a typed line means: a command, or text to send.

/// One typed line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
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

pub const HELP: &str = "commands: /to HOST:PORT (destination; /to HOST: an IP Messenger user; /to alone: every peer), /msg NICK text or @NICK text, /all text, /who, /stats, /nick NAME, /away [TEXT], /back, /help, /quit; a line starting with // sends one starting with /";

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
    }
}
