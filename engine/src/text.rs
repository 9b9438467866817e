//! Text escapes for keys and values on one line (the shell's answers,
//! `admin dump`, and keys in the engine's error messages): any bytes,
//! written so that every record stays on one line and reads back exactly.

/// Escapes `v` for a one-line answer: `\` becomes `\\`; newline, carriage
/// return and tab become `\n`, `\r`, `\t`; other control characters, line
/// and paragraph separators and bytes that are not UTF-8 become `\xNN`;
/// everything else (spaces and non-ASCII text included) is written as is.
/// [`unescape`] reverses it.
pub fn escape(v: &[u8]) -> String {
    let mut out = String::with_capacity(v.len());
    let hex = |out: &mut String, bytes: &[u8]| {
        for b in bytes {
            out.push_str(&format!("\\x{b:02x}"));
        }
    };
    for chunk in v.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    let mut buf = [0; 4];
                    hex(&mut out, c.encode_utf8(&mut buf).as_bytes());
                }
                c => out.push(c),
            }
        }
        hex(&mut out, chunk.invalid());
    }
    out
}

/// Reads the escapes [`escape`] writes (`\\`, `\n`, `\r`, `\t`, `\xNN`);
/// any other backslash sequence is an error.
pub fn unescape(s: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] != b'\\' {
            out.push(s[i]);
            i += 1;
            continue;
        }
        let byte = match s.get(i + 1) {
            Some(b'\\') => b'\\',
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'x') => {
                // Two hex digits exactly: `from_str_radix` alone took a
                // sign (`\x+a` read as a newline).
                let digits = s
                    .get(i + 2..i + 4)
                    .filter(|d| d.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|d| std::str::from_utf8(d).ok())
                    .and_then(|d| u8::from_str_radix(d, 16).ok());
                match digits {
                    Some(b) => {
                        out.push(b);
                        i += 4;
                        continue;
                    }
                    None => {
                        return Err(format!("bad escape at byte {i}: \\x needs two hex digits"))
                    }
                }
            }
            _ => {
                return Err(format!(
                    "bad escape at byte {i}: use \\\\, \\n, \\r, \\t or \\xNN"
                ))
            }
        };
        out.push(byte);
        i += 2;
    }
    Ok(out)
}

/// A key as error messages name it: escaped ([`escape`]) and quoted, so a
/// message stays on one line and the key reads back exactly.
pub(crate) fn quoted(key: &[u8]) -> String {
    format!("\"{}\"", escape(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `\x` takes exactly two hex digits: before, `u8::from_str_radix` also
    /// took a sign, and `\x+a` read as a newline.
    #[test]
    fn a_hex_escape_takes_two_hex_digits_only() {
        assert_eq!(unescape(br"a\x0ab\xffc").unwrap(), b"a\nb\xffc");
        for bad in [&br"\x+a"[..], br"\x-1", br"\x 1", br"\xg0", br"\x1"] {
            assert!(
                unescape(bad).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
