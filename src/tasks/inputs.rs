//! Texts to process, read from files: plain lines, JSONL with a text field, or CSV with a text
//! column. Each text remembers where it came from, and a bad line is an error of that line only.

use std::path::Path;

use crate::error::{Error, Result};

/// One input text and where it came from ("notes.txt:3", "argument 2", ...).
#[derive(Debug)]
pub struct InputText {
    pub origin: String,
    pub text: Result<String>,
}

/// How a file holds its texts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFormat {
    /// One text per line.
    Lines,
    /// One JSON object per line, text in a named field.
    Jsonl,
    /// A CSV (or TSV) file with a header, text in a named column.
    Csv { delimiter: u8 },
}

impl TextFormat {
    /// From the file extension: .jsonl/.ndjson/.json, .csv, .tsv; anything else is plain lines.
    pub fn from_path(path: &Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("jsonl" | "ndjson" | "json") => TextFormat::Jsonl,
            Some("csv") => TextFormat::Csv { delimiter: b',' },
            Some("tsv") => TextFormat::Csv { delimiter: b'\t' },
            _ => TextFormat::Lines,
        }
    }
}

/// Read every text of a file; `field` names the JSONL field or CSV column.
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<InputText>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let name = path.display().to_string();
    parse_texts(&bytes, &name, TextFormat::from_path(path), field)
}

/// Parse texts from bytes already read (a file's or stdin's); `name` labels their origins.
pub fn parse_texts(
    bytes: &[u8],
    name: &str,
    format: TextFormat,
    field: &str,
) -> Result<Vec<InputText>> {
    match format {
        TextFormat::Lines => Ok(lines(bytes)
            .map(|(n, line)| InputText {
                origin: format!("{name}:{n}"),
                text: utf8(line).map(str::to_string),
            })
            .collect()),
        TextFormat::Jsonl => Ok(lines(bytes)
            .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
            .map(|(n, line)| InputText {
                origin: format!("{name}:{n}"),
                text: utf8(line).and_then(|l| json_field(l, field)),
            })
            .collect()),
        TextFormat::Csv { delimiter } => csv_column(bytes, name, delimiter, field),
    }
}

/// (1-based line number, line without its newline); a final newline does not make an extra line.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let empty = bytes.is_empty();
    body.split(|&b| b == b'\n')
        .filter(move |_| !empty)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .enumerate()
        .map(|(i, line)| (i + 1, line))
}

fn utf8(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes)
        .map_err(|e| Error::invalid(format!("invalid UTF-8 at byte {}", e.valid_up_to())))
}

fn json_field(line: &str, field: &str) -> Result<String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| Error::invalid(format!("invalid JSON: {e}")))?;
    match value.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Error::invalid(format!("field `{field}` is not a string"))),
        None => Err(Error::invalid(format!("no `{field}` field"))),
    }
}

fn csv_column(bytes: &[u8], name: &str, delimiter: u8, field: &str) -> Result<Vec<InputText>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_reader(bytes);
    let headers = reader
        .byte_headers()
        .map_err(|e| Error::invalid(format!("{name}: unreadable CSV header: {e}")))?
        .clone();
    let column = headers
        .iter()
        .position(|h| String::from_utf8_lossy(h).trim() == field)
        .ok_or_else(|| {
            let found: Vec<String> = headers
                .iter()
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .collect();
            Error::invalid(format!(
                "{name}: no `{field}` column (the header has: {})",
                found.join(", ")
            ))
        })?;
    let mut out = Vec::new();
    for record in reader.byte_records() {
        let (origin, text) = match record {
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line());
                let text = match record.get(column) {
                    Some(cell) => utf8(cell).map(str::to_string),
                    None => Err(Error::invalid(format!(
                        "the row has {} fields, no `{field}` column",
                        record.len()
                    ))),
                };
                (format!("{name}:{line}"), text)
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                (
                    format!("{name}:{line}"),
                    Err(Error::invalid(format!("malformed CSV: {e}"))),
                )
            }
        };
        out.push(InputText { origin, text });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(bytes: &[u8], format: TextFormat) -> Vec<Result<String, String>> {
        parse_texts(bytes, "f", format, "text")
            .unwrap()
            .into_iter()
            .map(|t| t.text.map_err(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn plain_lines_keep_blank_lines_and_flag_bad_utf8() {
        let got = texts(b"one\r\n\ntw\xffo\nthree\n", TextFormat::Lines);
        assert_eq!(got[0], Ok("one".into()));
        assert_eq!(got[1], Ok("".into()));
        assert!(got[2].as_ref().unwrap_err().contains("invalid UTF-8"));
        assert_eq!(got[3], Ok("three".into()));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn jsonl_reads_the_named_field() {
        let got = texts(
            b"{\"text\": \"a\"}\n\n{\"other\": 1}\nnot json\n",
            TextFormat::Jsonl,
        );
        assert_eq!(got[0], Ok("a".into()));
        assert!(got[1].as_ref().unwrap_err().contains("no `text` field"));
        assert!(got[2].as_ref().unwrap_err().contains("invalid JSON"));
    }

    #[test]
    fn csv_reads_the_column_and_names_a_missing_one() {
        let csv = TextFormat::Csv { delimiter: b',' };
        let got = texts(b"id,text\n1,\"hello, world\"\n2,bye\n", csv);
        assert_eq!(got, vec![Ok("hello, world".into()), Ok("bye".into())]);
        let err = parse_texts(b"id,body\n1,x\n", "f.csv", csv, "text").unwrap_err();
        assert!(
            err.to_string()
                .contains("no `text` column (the header has: id, body)"),
            "{err}"
        );
    }
}
