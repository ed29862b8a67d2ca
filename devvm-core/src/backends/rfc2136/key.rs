//! TSIG keys: the algorithms, and the BIND key-file parser (`tsig-keygen` output).

use super::*;

/// A TSIG HMAC algorithm that can sign updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TsigAlgorithm {
    /// `hmac-sha256` (what `tsig-keygen` makes by default).
    HmacSha256,
    /// `hmac-sha384`.
    HmacSha384,
    /// `hmac-sha512`.
    HmacSha512,
}

impl TsigAlgorithm {
    /// The name BIND uses (`hmac-sha256`).
    pub fn as_str(self) -> &'static str {
        match self {
            TsigAlgorithm::HmacSha256 => "hmac-sha256",
            TsigAlgorithm::HmacSha384 => "hmac-sha384",
            TsigAlgorithm::HmacSha512 => "hmac-sha512",
        }
    }

    pub(super) fn to_proto(self) -> ProtoTsigAlgorithm {
        match self {
            TsigAlgorithm::HmacSha256 => ProtoTsigAlgorithm::HmacSha256,
            TsigAlgorithm::HmacSha384 => ProtoTsigAlgorithm::HmacSha384,
            TsigAlgorithm::HmacSha512 => ProtoTsigAlgorithm::HmacSha512,
        }
    }
}

impl fmt::Display for TsigAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TsigAlgorithm {
    type Err = Error;

    /// Parses `hmac-sha256`, `hmac-sha384`, `hmac-sha512` (any case, an optional trailing
    /// dot).
    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
        match name.as_str() {
            "hmac-sha256" => Ok(TsigAlgorithm::HmacSha256),
            "hmac-sha384" => Ok(TsigAlgorithm::HmacSha384),
            "hmac-sha512" => Ok(TsigAlgorithm::HmacSha512),
            _ => Err(Rfc2136Error::UnknownAlgorithm(shown(s)).into()),
        }
    }
}

/// A TSIG key: its name, algorithm and secret.
///
/// `Debug` shows the name and the algorithm, never the secret.
#[derive(Clone)]
pub struct TsigKey {
    pub(super) name: Name,
    pub(super) algorithm: TsigAlgorithm,
    pub(super) signer: TSigner,
}

impl TsigKey {
    /// A key from its parts. `secret` is the raw key (not base64).
    pub fn new(name: &str, algorithm: TsigAlgorithm, secret: SecretSlice<u8>) -> Result<Self> {
        let key_name = parse_dns_name(name).map_err(|why| Rfc2136Error::BadKeyName {
            name: shown(name),
            why,
        })?;
        if secret.expose_secret().is_empty() {
            return Err(Rfc2136Error::EmptySecret(key_name).into());
        }
        let signer = TSigner::new(
            secret.expose_secret().to_vec(),
            algorithm.to_proto(),
            key_name.clone(),
            FUDGE_SECS,
        )
        .map_err(|_| Rfc2136Error::SignerAlgorithm {
            key: key_name.clone(),
            algorithm,
        })?;
        Ok(TsigKey {
            name: key_name,
            algorithm,
            signer,
        })
    }

    /// Parses a key in BIND's format (`key "name" { algorithm hmac-sha256; secret
    /// "base64"; };`, as written by `tsig-keygen`). Comments (`#`, `//`, `/* */`) and any
    /// layout are accepted; the text must hold exactly one key. Errors give line numbers
    /// and never quote the text.
    pub fn parse_bind(text: &str) -> Result<Self> {
        let parsed = keyfile::parse(text).map_err(Rfc2136Error::KeySyntax)?;
        let algorithm =
            parsed
                .algorithm
                .parse::<TsigAlgorithm>()
                .map_err(|_| Rfc2136Error::KeyAlgorithm {
                    key: parsed.name.clone(),
                    algorithm: shown(&parsed.algorithm),
                })?;
        let secret = decode_secret(parsed.secret.expose_secret())
            .ok_or_else(|| Rfc2136Error::SecretNotBase64(parsed.name.clone()))?;
        TsigKey::new(&parsed.name, algorithm, secret)
    }

    /// Reads and parses the key file at `path` (see [`parse_bind`](Self::parse_bind)).
    /// A missing, unreadable or malformed file is [`ErrorKind::InvalidInput`] naming the
    /// file, never quoting it.
    ///
    /// [`ErrorKind::InvalidInput`]: crate::ErrorKind::InvalidInput
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            crate::secret::read_secret_file(path).map_err(|source| Rfc2136Error::KeyFileRead {
                path: path.to_owned(),
                source,
            })?;
        let text = SecretSlice::from(text.into_bytes());
        let text = std::str::from_utf8(text.expose_secret())
            .map_err(|_| Rfc2136Error::KeyFileNotUtf8(path.to_owned()))?;
        TsigKey::parse_bind(text).map_err(|e| {
            Rfc2136Error::KeyFile {
                path: path.to_owned(),
                why: e.message().to_owned(),
            }
            .into()
        })
    }

    /// The key's name, without the trailing dot.
    pub fn name(&self) -> String {
        without_dot(&self.name)
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> TsigAlgorithm {
        self.algorithm
    }
}

impl fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TsigKey")
            .field("name", &self.name())
            .field("algorithm", &self.algorithm)
            .field("secret", &"<redacted>")
            .finish()
    }
}

pub(super) fn decode_secret(text: &str) -> Option<SecretSlice<u8>> {
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let compact = SecretSlice::from(compact.into_bytes());
    let bytes = data_encoding::BASE64
        .decode(compact.expose_secret())
        .or_else(|_| data_encoding::BASE64_NOPAD.decode(compact.expose_secret()))
        .ok()?;
    Some(SecretSlice::from(bytes))
}

/// A string shortened for an error message.
pub(super) fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// The BIND key-file parser. Pure; its errors are line numbers and expectations, never
/// the file's text.
mod keyfile {
    use secrecy::SecretString;

    pub(super) struct ParsedKey {
        pub(super) name: String,
        pub(super) algorithm: String,
        pub(super) secret: SecretString,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Tok<'a> {
        Word(&'a str),
        Str(&'a str),
        Open,
        Close,
        Semi,
    }

    struct Lexer<'a> {
        text: &'a str,
        pos: usize,
        line: usize,
    }

    impl<'a> Lexer<'a> {
        fn new(text: &'a str) -> Self {
            Lexer {
                text,
                pos: 0,
                line: 1,
            }
        }

        fn rest(&self) -> &'a str {
            &self.text[self.pos..]
        }

        fn bump(&mut self, n: usize) {
            self.line += self.text[self.pos..self.pos + n].matches('\n').count();
            self.pos += n;
        }

        /// Skips whitespace and comments.
        fn skip(&mut self) -> Result<(), String> {
            loop {
                let rest = self.rest();
                let trimmed = rest.trim_start();
                self.bump(rest.len() - trimmed.len());
                let rest = self.rest();
                if rest.starts_with('#') || rest.starts_with("//") {
                    let end = rest.find('\n').unwrap_or(rest.len());
                    self.bump(end);
                } else if let Some(body) = rest.strip_prefix("/*") {
                    let start = self.line;
                    match body.find("*/") {
                        Some(end) => self.bump(end + 4),
                        None => return Err(format!("line {start}: unterminated /* comment")),
                    }
                } else {
                    return Ok(());
                }
            }
        }

        fn next(&mut self) -> Result<Option<(Tok<'a>, usize)>, String> {
            self.skip()?;
            let line = self.line;
            let rest = self.rest();
            let Some(c) = rest.chars().next() else {
                return Ok(None);
            };
            let tok = match c {
                '{' => {
                    self.bump(1);
                    Tok::Open
                }
                '}' => {
                    self.bump(1);
                    Tok::Close
                }
                ';' => {
                    self.bump(1);
                    Tok::Semi
                }
                '"' => {
                    let body = &rest[1..];
                    let mut escaped = false;
                    let mut end = None;
                    for (i, ch) in body.char_indices() {
                        match ch {
                            _ if escaped => escaped = false,
                            '\\' => escaped = true,
                            '"' => {
                                end = Some(i);
                                break;
                            }
                            _ => {}
                        }
                    }
                    let Some(end) = end else {
                        return Err(format!("line {line}: unterminated quoted string"));
                    };
                    let s = &body[..end];
                    self.bump(end + 2);
                    Tok::Str(s)
                }
                _ => {
                    let end = rest
                        .find(|ch: char| {
                            ch.is_whitespace() || matches!(ch, '{' | '}' | ';' | '"' | '#')
                        })
                        .unwrap_or(rest.len());
                    let end = match rest[..end].find("//").or_else(|| rest[..end].find("/*")) {
                        Some(0) | None => end,
                        Some(cut) => cut,
                    };
                    let word = &rest[..end];
                    self.bump(end);
                    Tok::Word(word)
                }
            };
            Ok(Some((tok, line)))
        }
    }

    fn unescape(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut escaped = false;
        for c in s.chars() {
            if escaped || c != '\\' {
                out.push(c);
                escaped = false;
            } else {
                escaped = true;
            }
        }
        out
    }

    /// Parses the one `key` statement of `text`.
    pub(super) fn parse(text: &str) -> Result<ParsedKey, String> {
        let mut lx = Lexer::new(text);
        let mut key: Option<ParsedKey> = None;
        while let Some((tok, line)) = lx.next()? {
            match tok {
                Tok::Word(w) if w.eq_ignore_ascii_case("key") => {}
                _ => {
                    return Err(format!(
                        "line {line}: expected a `key \"name\" {{ ... }};` statement"
                    ));
                }
            }
            let parsed = parse_key_body(&mut lx, line)?;
            if key.is_some() {
                return Err(format!(
                    "line {line}: holds more than one key; keep one key per file"
                ));
            }
            key = Some(parsed);
        }
        key.ok_or_else(|| "holds no `key \"name\" { ... };` statement".to_owned())
    }

    fn expect_semi(lx: &mut Lexer<'_>, after: &str) -> Result<(), String> {
        match lx.next()? {
            Some((Tok::Semi, _)) => Ok(()),
            Some((_, line)) => Err(format!("line {line}: expected `;` after {after}")),
            None => Err(format!("ends before the `;` after {after}")),
        }
    }

    fn parse_key_body(lx: &mut Lexer<'_>, key_line: usize) -> Result<ParsedKey, String> {
        let name = match lx.next()? {
            Some((Tok::Str(s) | Tok::Word(s), _)) if !s.is_empty() => unescape(s),
            Some((_, line)) => {
                return Err(format!("line {line}: expected the key name after `key`"));
            }
            None => return Err(format!("line {key_line}: ends after `key`")),
        };
        match lx.next()? {
            Some((Tok::Open, _)) => {}
            Some((_, line)) => {
                return Err(format!("line {line}: expected `{{` after the key name"));
            }
            None => return Err(format!("line {key_line}: ends after the key name")),
        }
        let mut algorithm: Option<String> = None;
        let mut secret: Option<SecretString> = None;
        loop {
            let Some((tok, line)) = lx.next()? else {
                return Err(format!("line {key_line}: the key's `{{` is never closed"));
            };
            match tok {
                Tok::Close => break,
                Tok::Semi => continue,
                Tok::Word(w) if w.eq_ignore_ascii_case("algorithm") => {
                    let value = match lx.next()? {
                        Some((Tok::Word(v) | Tok::Str(v), _)) if !v.is_empty() => unescape(v),
                        _ => return Err(format!("line {line}: expected an algorithm name")),
                    };
                    if algorithm.replace(value).is_some() {
                        return Err(format!("line {line}: the key has two algorithms"));
                    }
                    expect_semi(lx, "the algorithm")?;
                }
                Tok::Word(w) if w.eq_ignore_ascii_case("secret") => {
                    let value = match lx.next()? {
                        Some((Tok::Word(v) | Tok::Str(v), _)) if !v.is_empty() => {
                            SecretString::from(unescape(v))
                        }
                        _ => return Err(format!("line {line}: expected the secret, quoted")),
                    };
                    if secret.replace(value).is_some() {
                        return Err(format!("line {line}: the key has two secrets"));
                    }
                    expect_semi(lx, "the secret")?;
                }
                _ => {
                    return Err(format!(
                        "line {line}: expected `algorithm ...;`, `secret \"...\";` or `}}`"
                    ));
                }
            }
        }
        match lx.next()? {
            Some((Tok::Semi, _)) => {}
            Some((_, line)) => {
                return Err(format!("line {line}: expected `;` after the key's `}}`"));
            }
            None => return Err("ends before the `;` after the key's `}`".to_owned()),
        }
        let algorithm = algorithm.ok_or_else(|| format!("key {name:?} has no algorithm"))?;
        let secret = secret.ok_or_else(|| format!("key {name:?} has no secret"))?;
        Ok(ParsedKey {
            name,
            algorithm,
            secret,
        })
    }
}
