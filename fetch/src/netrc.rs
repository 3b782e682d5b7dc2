//! `~/.netrc`: the logins curl and wget read for hosts (`machine HOST login USER password
//! PASS`, and `default`). Only the fields fetch needs are kept; `macdef` bodies are skipped.

/// One `machine` (or the `default`) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// `None` for `default`.
    pub machine: Option<String>,
    pub login: String,
    pub password: String,
}

/// The entries of a netrc file's text, in order.
pub fn parse(text: &str) -> Vec<Login> {
    let mut out = Vec::new();
    let mut current: Option<Login> = None;
    let mut lines = text.lines();
    let mut tokens: Vec<String> = Vec::new();
    // A macro definition runs to the next empty line: its lines are not tokens.
    while let Some(line) = lines.next() {
        for w in line.split_whitespace().map(str::to_string) {
            if w == "macdef" {
                for body in lines.by_ref() {
                    if body.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            tokens.push(w);
        }
    }
    let mut it = tokens.into_iter();
    while let Some(t) = it.next() {
        match t.as_str() {
            "machine" | "default" => {
                out.extend(current.take());
                let machine = match t == "machine" {
                    // A `machine` without a name (the file's last word) is no entry: never
                    // the `default` that would go to every host.
                    true => match it.next() {
                        Some(m) => Some(m.to_ascii_lowercase()),
                        None => continue,
                    },
                    false => None,
                };
                current = Some(Login {
                    machine,
                    login: String::new(),
                    password: String::new(),
                });
            }
            "login" => {
                if let (Some(c), Some(v)) = (current.as_mut(), it.next()) {
                    c.login = v;
                }
            }
            "password" => {
                if let (Some(c), Some(v)) = (current.as_mut(), it.next()) {
                    c.password = v;
                }
            }
            "account" => {
                it.next();
            }
            _ => {}
        }
    }
    out.extend(current);
    out
}

/// The login for `host`: its `machine` entry, else the `default` one.
pub fn find<'a>(logins: &'a [Login], host: &str) -> Option<&'a Login> {
    let host = host.to_ascii_lowercase();
    logins
        .iter()
        .find(|l| l.machine.as_deref() == Some(host.as_str()))
        .or_else(|| logins.iter().find(|l| l.machine.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_default_and_macros() {
        let text = "machine Example.org login ann password s3cret\n\
                    macdef init\nmachine evil.org login x password y\n\n\
                    machine b.net\n  login bob\n  password pw\ndefault login anonymous password me@home\n";
        let logins = parse(text);
        assert_eq!(logins.len(), 3, "{logins:?}");
        let a = find(&logins, "example.ORG").unwrap();
        assert_eq!((a.login.as_str(), a.password.as_str()), ("ann", "s3cret"));
        assert_eq!(find(&logins, "b.net").unwrap().login, "bob");
        assert_eq!(find(&logins, "evil.org").unwrap().login, "anonymous");
        assert!(find(&parse("machine a login b password c"), "z").is_none());
        // A file that ends in `machine` has no login for every other host.
        assert!(find(&parse("machine a login b password c\nmachine"), "z").is_none());
    }
}
