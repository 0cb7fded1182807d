//! Text cleaning as open_clip's `clean='lower'`: `ftfy.fix_text`, `html.unescape` twice, strip, collapse
//! whitespace, lower-case.
//!
//! Of ftfy's fixes this ports the ones that change plain captions: line-break normalisation, removal of
//! terminal escapes and control characters, curly quotes to straight ones, Latin ligatures, full-width
//! characters, and NFC. Mojibake repair (text decoded with the wrong codec) is not ported: captions are read
//! as UTF-8, and the golden test covers every caption of RSICD, RSITMD, UCM and Sydney.

use unicode_normalization::UnicodeNormalization;

pub fn clean_text(text: &str) -> String {
    py_lower(&clean_whitespace(text))
}

/// open_clip's `clean='whitespace'` (its Hugging Face tokenizers' default): the same without
/// lower-casing.
pub fn clean_whitespace(text: &str) -> String {
    let text = fix_text(text);
    let text = html_unescape(&html_unescape(&text));
    text.split(is_py_whitespace)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Python's `str.isspace()` set, which is what `re`'s `\s` and `str.strip()` use.
fn is_py_whitespace(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\x0b' | '\x0c' | '\r' | '\x1c'..='\x1f' | ' ' | '\u{85}' | '\u{a0}'
    ) || (c > '\u{ff}' && c.is_whitespace())
}

fn py_lower(s: &str) -> String {
    // Rust's to_lowercase follows the same Unicode rules as Python's (including final sigma).
    s.to_lowercase()
}

fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // Terminal escapes: ESC [ ... letter.
            '\x1b' if chars.peek() == Some(&'[') => {
                chars.next();
                while let Some(&n) = chars.peek() {
                    chars.next();
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push('\n');
            }
            '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' | '\u{2032}' => out.push('\''),
            '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' | '\u{2033}' => out.push('"'),
            '\u{fb00}' => out.push_str("ff"),
            '\u{fb01}' => out.push_str("fi"),
            '\u{fb02}' => out.push_str("fl"),
            '\u{fb03}' => out.push_str("ffi"),
            '\u{fb04}' => out.push_str("ffl"),
            '\u{fb05}' | '\u{fb06}' => out.push_str("st"),
            '\u{0132}' => out.push_str("IJ"),
            '\u{0133}' => out.push_str("ij"),
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(c as u32 - 0xff01 + 0x21).unwrap()),
            // ftfy's remove_control_chars: C0 controls except \t \n \x0c, DEL, and a set of format characters.
            '\x00'..='\x08' | '\x0b' | '\x0e'..='\x1f' | '\x7f' => {}
            '\u{206a}'..='\u{206f}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => {}
            _ => out.push(c),
        }
    }
    out.nfc()
        .collect::<String>()
        .trim_matches(is_py_whitespace)
        .to_string()
}

/// Python's `html.unescape` for numeric references and the named entities that occur in practice.
pub(crate) fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match unescape_one(rest) {
            Some((text, used)) => {
                out.push_str(&text);
                rest = &rest[used..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes one reference at the start of `s` (which begins with '&'); returns the text and bytes consumed.
fn unescape_one(s: &str) -> Option<(String, usize)> {
    let body = &s[1..];
    if let Some(num) = body.strip_prefix('#') {
        let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (
                hex.chars()
                    .take_while(|c| c.is_ascii_hexdigit())
                    .collect::<String>(),
                16,
                3,
            ),
            None => (
                num.chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect::<String>(),
                10,
                2,
            ),
        };
        if digits.is_empty() {
            return None;
        }
        let mut used = 1 + skip - 1 + digits.len();
        if s[used..].starts_with(';') {
            used += 1;
        }
        let code = u32::from_str_radix(&digits, radix).unwrap_or(0x110000);
        let c = match code {
            0x80..=0x9f => cp1252(code),
            0 | 0xd800..=0xdfff | 0x110000.. => '\u{fffd}',
            _ => char::from_u32(code).unwrap_or('\u{fffd}'),
        };
        return Some((c.to_string(), used));
    }
    let name: String = body
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .take(32)
        .collect();
    if name.is_empty() {
        return None;
    }
    let with_semicolon = body[name.len()..].starts_with(';');
    if let Some(v) = named_entity(&name) {
        return Some((v.to_string(), 1 + name.len() + with_semicolon as usize));
    }
    // Python also accepts a few legacy names without ';' as a prefix of a longer word (e.g. "&ampx").
    for legacy in ["amp", "lt", "gt", "quot", "nbsp", "copy", "reg"] {
        if name.starts_with(legacy) {
            return Some((named_entity(legacy).unwrap().to_string(), 1 + legacy.len()));
        }
    }
    None
}

fn cp1252(code: u32) -> char {
    const TABLE: [u32; 32] = [
        0x20ac, 0x81, 0x201a, 0x0192, 0x201e, 0x2026, 0x2020, 0x2021, 0x02c6, 0x2030, 0x0160,
        0x2039, 0x0152, 0x8d, 0x017d, 0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013,
        0x2014, 0x02dc, 0x2122, 0x0161, 0x203a, 0x0153, 0x9d, 0x017e, 0x0178,
    ];
    char::from_u32(TABLE[(code - 0x80) as usize]).unwrap()
}

fn named_entity(name: &str) -> Option<&'static str> {
    Some(match name {
        "amp" | "AMP" => "&",
        "lt" | "LT" => "<",
        "gt" | "GT" => ">",
        "quot" | "QUOT" => "\"",
        "apos" => "'",
        "nbsp" => "\u{a0}",
        "copy" | "COPY" => "©",
        "reg" | "REG" => "®",
        "deg" => "°",
        "plusmn" => "±",
        "times" => "×",
        "divide" => "÷",
        "middot" => "·",
        "ndash" => "–",
        "mdash" => "—",
        "lsquo" => "‘",
        "rsquo" => "’",
        "ldquo" => "“",
        "rdquo" => "”",
        "hellip" => "…",
        "bull" => "•",
        "euro" => "€",
        "pound" => "£",
        "yen" => "¥",
        "cent" => "¢",
        "sect" => "§",
        "para" => "¶",
        "laquo" => "«",
        "raquo" => "»",
        "eacute" => "é",
        "egrave" => "è",
        "agrave" => "à",
        "aacute" => "á",
        "ccedil" => "ç",
        "uuml" => "ü",
        "ouml" => "ö",
        "auml" => "ä",
        "szlig" => "ß",
        "ntilde" => "ñ",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_rules() {
        assert_eq!(
            clean_text("  It's 3 storage-tanks &amp; a   pond "),
            "it's 3 storage-tanks & a pond"
        );
        assert_eq!(clean_text("&amp;amp; &#x41;&#66;"), "& ab");
        assert_eq!(clean_text("\u{2018}A\u{2019}\r\nB\tC"), "'a' b c");
        assert_eq!(clean_text("\u{ff21}\u{fb01}"), "afi");
    }
}
