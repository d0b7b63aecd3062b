//! Which instance fields the templates read, so that the template values hold only those.
//!
//! An instance is a tera map of eight fields, about 780 bytes in tera 2.4 (an entry of 64
//! bytes per field plus a hash index), and the maps of every instance are held across renders
//! (the value cache): 18 MB of a 27 MB heap at 2,000 × 10. A field no template names can never
//! be read, so it is left out of the maps. A template names a field when the field's name is a
//! word inside its tera code (`{{ … }}` or `{% … %}`, not the HAProxy text around it):
//! `i.addr`, `i["addr"]` and a macro argument `addr` all count. A template that walks the
//! pairs of a map (`{% for k, v in … %}`) may see every field: it gets all of them.
//!
//! What changes for a template: an instance map printed whole, or its `length`, shows only the
//! named fields. An attribute read with a key computed at render time (`i[field]`) finds
//! nothing unless the field's name is written somewhere in the templates. Both are documented.

/// The fields of an instance in the template context, in their order in the map.
pub const INSTANCE_FIELDS: [&str; 8] = [
    "id", "name", "host", "port", "addr", "weight", "state", "meta",
];

/// A set of [`INSTANCE_FIELDS`], by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields(u8);

impl Fields {
    pub const ALL: Fields = Fields(u8::MAX);

    /// Whether the field `INSTANCE_FIELDS[i]` is in the set.
    pub fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }

    /// The fields template sources `texts` can read.
    pub fn read_by<'a>(texts: impl IntoIterator<Item = &'a str>) -> Fields {
        let mut set = 0u8;
        for text in texts {
            for code in code(text) {
                if walks_pairs(code) {
                    return Fields::ALL;
                }
                for (i, field) in INSTANCE_FIELDS.iter().enumerate() {
                    if has_word(code, field) {
                        set |= 1 << i;
                    }
                }
            }
        }
        Fields(set)
    }

    /// How many fields the set holds.
    pub fn count(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The names in the set, in map order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        INSTANCE_FIELDS
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.has(*i))
            .map(|(_, f)| *f)
    }
}

/// The tera code of a template: what is inside `{{ … }}` and `{% … %}` (comments `{# … #}`
/// left out). An unclosed tag runs to the end of the text, so nothing is missed.
fn code(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let close = match after.as_bytes().first() {
            Some(b'{') => "}}",
            Some(b'%') => "%}",
            Some(b'#') => {
                rest = after.find("#}").map_or("", |end| &after[end + 2..]);
                continue;
            }
            _ => {
                rest = after;
                continue;
            }
        };
        let body = &after[1..];
        match body.find(close) {
            Some(end) => {
                out.push(&body[..end]);
                rest = &body[end + 2..];
            }
            None => {
                out.push(body);
                rest = "";
            }
        }
    }
    out
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether `word` appears in `code` with no letter, digit or `_` on either side.
fn has_word(code: &str, word: &str) -> bool {
    let b = code.as_bytes();
    code.match_indices(word).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| b[i]);
        let after = b.get(at + word.len()).copied();
        !before.is_some_and(is_word_byte) && !after.is_some_and(is_word_byte)
    })
}

/// Whether `code` is a `for` over the pairs of a map: `for k, v in …`.
fn walks_pairs(code: &str) -> bool {
    let code = code.trim_start_matches(['-', '+']).trim_start();
    let Some(rest) = code.strip_prefix("for") else {
        return false;
    };
    if !rest.starts_with(|c: char| c.is_whitespace()) {
        return false;
    }
    let rest = rest.trim_start();
    let ident = rest.bytes().take_while(|b| is_word_byte(*b)).count();
    ident > 0 && rest[ident..].trim_start().starts_with(',')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(texts: &[&str]) -> Vec<&'static str> {
        Fields::read_by(texts.iter().copied()).names().collect()
    }

    #[test]
    fn fields_named_in_tera_code_are_read_and_haproxy_text_is_not() {
        let t = "backend x\n    http-request set-var(txn.host) req.hdr(host)\n\
                 {%- for i in s.instances %}\n    server {{ i.name }} {{ i[\"addr\"] }}\n{% endfor %}";
        assert_eq!(names(&[t]), ["name", "addr"]);
        // Words inside other words do not count; comments are not code.
        assert_eq!(
            names(&["{{ s.hostname }} {# i.port #} {{ weights }}"]),
            Vec::<&str>::new()
        );
        // A macro argument, a filter argument, an unclosed tag.
        assert_eq!(
            names(&[
                "{% macro m(state) %}{% endmacro %}",
                "{{ x | default(value=port) }}",
                "{{ i.meta"
            ]),
            ["port", "state", "meta"]
        );
    }

    #[test]
    fn a_loop_over_the_pairs_of_a_map_reads_every_field() {
        assert_eq!(
            Fields::read_by(["{%- for k, v in i %}{{ k }}{% endfor %}"]),
            Fields::ALL
        );
        assert_eq!(
            Fields::read_by(["{% for k,v in i %}{% endfor %}"]),
            Fields::ALL
        );
        assert_ne!(
            Fields::read_by(["{% for i in s.instances %}{% endfor %}"]),
            Fields::ALL
        );
        assert_ne!(Fields::read_by(["{% format, x %}"]), Fields::ALL);
    }

    #[test]
    fn the_default_template_reads_what_its_server_lines_need() {
        let text = include_str!("../../templates/haproxy.cfg.tera");
        let read = names(&[text]);
        for f in ["id", "name", "addr", "weight", "state"] {
            assert!(read.contains(&f), "{f} in {read:?}");
        }
    }
}
