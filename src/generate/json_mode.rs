//! JSON mode (`response_format: {"type": "json_object"}`): sampling is constrained so that the
//! output is always a prefix of one JSON object, and generation ends when the object closes.
//! A character-level recogniser small enough to copy (`Copy`) lets every vocabulary token be
//! tried against the current state at each step.

/// Where the recogniser is inside the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the top-level object.
    Start,
    /// A value is expected (after `:`, `,` in an array, or `[`). `array_start` allows `]`.
    Value {
        array_start: bool,
    },
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closing bracket.
    AfterValue,
    /// Inside a string; `escape` counts what is left of an escape (1 after `\`, 4..1 hex digits).
    Str {
        key: bool,
        escape: u8,
    },
    Number(NumberPart),
    /// Inside `true`/`false`/`null`: the bytes still expected.
    Literal {
        rest: &'static [u8],
    },
    /// The top-level object is closed.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NumberPart {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

/// Nesting depth the recogniser supports (one bit per open container).
const MAX_DEPTH: u8 = 64;
/// Whitespace allowed in a row outside strings, so a model cannot idle forever.
const MAX_WHITESPACE_RUN: u8 = 16;

/// A JSON-object prefix recogniser.
#[derive(Clone, Copy, Debug)]
pub struct JsonPrefix {
    state: State,
    /// Bit i set: container i is an array (else an object).
    stack: u64,
    depth: u8,
    whitespace_run: u8,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        JsonPrefix {
            state: State::Start,
            stack: 0,
            depth: 0,
            whitespace_run: 0,
        }
    }
}

impl JsonPrefix {
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Whether `text` can follow what was fed so far (without feeding it).
    pub fn accepts(&self, text: &str) -> bool {
        let mut copy = *self;
        copy.feed_str(text)
    }

    /// Feed text; false (and the state is unspecified) when it cannot continue a JSON object.
    pub fn feed_str(&mut self, text: &str) -> bool {
        text.chars().all(|c| self.feed(c))
    }

    fn push(&mut self, array: bool) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        if array {
            self.stack |= 1 << self.depth;
        } else {
            self.stack &= !(1 << self.depth);
        }
        self.depth += 1;
        self.state = if array {
            State::Value { array_start: true }
        } else {
            State::KeyOrEnd
        };
        true
    }

    fn in_array(&self) -> bool {
        self.depth > 0 && self.stack & (1 << (self.depth - 1)) != 0
    }

    /// Close the innermost container with `c` if it matches.
    fn pop(&mut self, c: char) -> bool {
        if self.depth == 0 || (c == ']') != self.in_array() {
            return false;
        }
        self.depth -= 1;
        self.state = if self.depth == 0 {
            State::Done
        } else {
            State::AfterValue
        };
        true
    }

    fn start_value(&mut self, c: char) -> bool {
        self.state = match c {
            '{' => return self.push(false),
            '[' => return self.push(true),
            '"' => State::Str {
                key: false,
                escape: 0,
            },
            '-' => State::Number(NumberPart::Minus),
            '0' => State::Number(NumberPart::Zero),
            '1'..='9' => State::Number(NumberPart::Int),
            't' => State::Literal { rest: b"rue" },
            'f' => State::Literal { rest: b"alse" },
            'n' => State::Literal { rest: b"ull" },
            _ => return false,
        };
        true
    }

    pub fn feed(&mut self, c: char) -> bool {
        let whitespace = matches!(c, ' ' | '\t' | '\n' | '\r');
        let in_string = matches!(self.state, State::Str { .. });
        if whitespace
            && !in_string
            && !matches!(
                self.state,
                State::Number(_) | State::Literal { .. } | State::Done
            )
        {
            self.whitespace_run += 1;
            return self.whitespace_run <= MAX_WHITESPACE_RUN && self.state != State::Done;
        }
        if !whitespace {
            self.whitespace_run = 0;
        }
        match self.state {
            State::Done => false,
            State::Start => c == '{' && self.push(false),
            State::Value { array_start } => {
                if c == ']' && array_start {
                    return self.pop(c);
                }
                self.start_value(c)
            }
            State::KeyOrEnd => match c {
                '"' => {
                    self.state = State::Str {
                        key: true,
                        escape: 0,
                    };
                    true
                }
                '}' => self.pop(c),
                _ => false,
            },
            State::Key => {
                self.state = State::Str {
                    key: true,
                    escape: 0,
                };
                c == '"'
            }
            State::Colon => {
                self.state = State::Value { array_start: false };
                c == ':'
            }
            State::AfterValue => match c {
                ',' => {
                    self.state = if self.in_array() {
                        State::Value { array_start: false }
                    } else {
                        State::Key
                    };
                    true
                }
                '}' | ']' => self.pop(c),
                _ => false,
            },
            State::Str { key, escape } => {
                match escape {
                    0 => match c {
                        '"' => self.state = if key { State::Colon } else { State::AfterValue },
                        '\\' => self.state = State::Str { key, escape: 1 },
                        c if (c as u32) < 0x20 => return false,
                        _ => {}
                    },
                    1 => match c {
                        '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => {
                            self.state = State::Str { key, escape: 0 }
                        }
                        'u' => self.state = State::Str { key, escape: 5 },
                        _ => return false,
                    },
                    n => {
                        if !c.is_ascii_hexdigit() {
                            return false;
                        }
                        self.state = State::Str {
                            key,
                            escape: if n == 2 { 0 } else { n - 1 },
                        };
                    }
                }
                true
            }
            State::Literal { rest } => {
                if rest.first() != Some(&(c as u32 as u8)) || !c.is_ascii() {
                    return false;
                }
                self.state = if rest.len() == 1 {
                    State::AfterValue
                } else {
                    State::Literal { rest: &rest[1..] }
                };
                true
            }
            State::Number(part) => {
                use NumberPart::*;
                let next = match (part, c) {
                    (Minus, '0') => Some(Zero),
                    (Minus, '1'..='9') => Some(Int),
                    (Int, '0'..='9') => Some(Int),
                    (Zero | Int, '.') => Some(Dot),
                    (Dot | Frac, '0'..='9') => Some(Frac),
                    (Zero | Int | Frac, 'e' | 'E') => Some(E),
                    (E, '+' | '-') => Some(ESign),
                    (E | ESign | Exp, '0'..='9') => Some(Exp),
                    _ => None,
                };
                match next {
                    Some(p) => {
                        self.state = State::Number(p);
                        true
                    }
                    // The number ended; the character must follow a complete number.
                    None if matches!(part, Zero | Int | Frac | Exp) => {
                        self.state = State::AfterValue;
                        self.feed(c)
                    }
                    None => false,
                }
            }
        }
    }
}

impl JsonPrefix {
    /// The shortest text that completes the object from here (what is forced when the token
    /// budget is about to run out, so that the output still parses).
    pub fn closing_text(&self) -> String {
        let mut out = String::new();
        let mut depth = self.depth;
        match self.state {
            State::Done => return out,
            State::Start => return "{}".into(),
            State::Value { array_start: true } => {}
            State::Value { array_start: false } => out.push_str("null"),
            State::KeyOrEnd | State::AfterValue => {}
            State::Key => out.push_str("\"\":null"),
            State::Colon => out.push_str(":null"),
            State::Str { key, escape } => {
                match escape {
                    0 => {}
                    1 => out.push('n'),
                    n => out.extend(std::iter::repeat_n('0', n as usize - 1)),
                }
                out.push('"');
                if key {
                    out.push_str(":null");
                }
            }
            State::Number(part) => {
                if matches!(
                    part,
                    NumberPart::Minus | NumberPart::Dot | NumberPart::E | NumberPart::ESign
                ) {
                    out.push('0');
                }
            }
            State::Literal { rest } => out.extend(rest.iter().map(|&b| b as char)),
        }
        while depth > 0 {
            depth -= 1;
            out.push(if self.stack & (1 << depth) != 0 {
                ']'
            } else {
                '}'
            });
        }
        out
    }
}

/// Keep only tokens whose text is a non-empty prefix of `closing` (and a valid continuation).
pub fn mask_to_closing(state: &JsonPrefix, closing: &str, texts: &[String], logits: &mut [f32]) {
    for (id, logit) in logits.iter_mut().enumerate() {
        let allowed = texts
            .get(id)
            .is_some_and(|t| !t.is_empty() && closing.starts_with(t.as_str()) && state.accepts(t));
        if !allowed {
            *logit = f32::NEG_INFINITY;
        }
    }
}

/// Set the logits of tokens that cannot continue the document to -inf. `texts[id]` is each
/// token's text; empty texts (special tokens) and `end_ids` are allowed only once complete.
pub fn mask_logits(state: &JsonPrefix, texts: &[String], end_ids: &[u32], logits: &mut [f32]) {
    for (id, logit) in logits.iter_mut().enumerate() {
        let allowed = match texts.get(id) {
            Some(text) if !text.is_empty() => {
                !end_ids.contains(&(id as u32)) && state.accepts(text)
            }
            _ => false,
        };
        if !allowed {
            *logit = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(text: &str) -> bool {
        let mut p = JsonPrefix::default();
        p.feed_str(text) && p.is_complete()
    }

    fn prefix_ok(text: &str) -> bool {
        JsonPrefix::default().accepts(text)
    }

    #[test]
    fn recognises_objects_and_rejects_everything_else() {
        for ok in [
            "{}",
            " {\"a\": 1}",
            "{\"a\": [1, -2.5e+3, 0, true, false, null, \"x\\n\\u00e9\"], \"b\": {\"c\": []}}",
            "{\n  \"name\": \"Zoë 🍕\"\n}",
        ] {
            assert!(complete(ok), "{ok}");
            // Every prefix is accepted.
            for (i, _) in ok.char_indices() {
                assert!(prefix_ok(&ok[..i]), "prefix {:?}", &ok[..i]);
            }
        }
        for bad in [
            "[1]",
            "\"x\"",
            "{a: 1}",
            "{\"a\" 1}",
            "{\"a\": 01}",
            "{\"a\": tru}",
            "{\"a\": 1,}",
            "{} {}",
            "{\"a\": \"\u{1}\"}",
            "{\"a\": [1}",
            "{\"a\": -}",
        ] {
            assert!(!complete(bad), "{bad}");
        }
        assert!(!prefix_ok("x"));
        assert!(!prefix_ok("{\"a\": 1]"));
        assert!(
            !prefix_ok(&format!("{{{}", " ".repeat(40))),
            "whitespace runs are bounded"
        );
    }

    #[test]
    fn closing_text_completes_any_prefix() {
        let doc = "{\"a\": [1, {\"b\": \"x\\u00e9\", \"c\": -1.5e-3, \"d\": tr";
        for (i, _) in doc.char_indices() {
            let mut p = JsonPrefix::default();
            assert!(p.feed_str(&doc[..i]));
            let closing = p.closing_text();
            assert!(
                p.feed_str(&closing) && p.is_complete(),
                "{:?} + {closing:?}",
                &doc[..i]
            );
        }
    }

    #[test]
    fn masking_keeps_only_continuations() {
        let texts: Vec<String> = ["{", "}", "\"", "a", "", ":", " 1", "<eos>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut state = JsonPrefix::default();
        let mut logits = vec![0f32; texts.len()];
        mask_logits(&state, &texts, &[7], &mut logits);
        let allowed: Vec<usize> = (0..texts.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        assert_eq!(allowed, vec![0]);
        assert!(state.feed_str("{\"a\""));
        let mut logits = vec![0f32; texts.len()];
        mask_logits(&state, &texts, &[7], &mut logits);
        let allowed: Vec<usize> = (0..texts.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        assert_eq!(allowed, vec![5]);
    }
}
