//! Labelled texts for classifier fine-tuning: CSV/TSV with `text` and `label` columns, JSONL
//! objects with `text` and `label`, or a folder with one sub-folder of `.txt` files per label.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One example and where it came from (for error messages).
#[derive(Clone, Debug)]
pub struct Example {
    pub text: String,
    pub label: String,
    pub origin: String,
}

/// Read every example of `path`. Malformed records are an error naming file and line, unless
/// `skip_errors`, when they are counted (second value) and left out.
pub fn read_examples(path: &Path, skip_errors: bool) -> Result<(Vec<Example>, usize)> {
    let mut examples = Vec::new();
    let mut skipped = 0;
    let mut problem = |origin: String, message: String| -> Result<()> {
        if skip_errors {
            skipped += 1;
            Ok(())
        } else {
            Err(Error::invalid(format!("{origin}: {message}")))
        }
    };
    if path.is_dir() {
        read_folder(path, &mut examples)?;
    } else {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match extension {
            "csv" | "tsv" => {
                let delimiter = if extension == "tsv" { b'\t' } else { b',' };
                let mut reader = csv::ReaderBuilder::new()
                    .delimiter(delimiter)
                    .flexible(true)
                    .from_reader(bytes.as_slice());
                let headers = reader
                    .headers()
                    .map_err(|e| Error::file(path, format!("unreadable header row: {e}")))?
                    .clone();
                let column = |name: &str| {
                    headers
                        .iter()
                        .position(|h| h.trim() == name)
                        .ok_or_else(|| {
                            Error::file(
                                path,
                                format!(
                                    "no `{name}` column (columns: {})",
                                    headers.iter().collect::<Vec<_>>().join(", ")
                                ),
                            )
                        })
                };
                let (text_column, label_column) = (column("text")?, column("label")?);
                for (i, record) in reader.records().enumerate() {
                    let origin = format!("{}:{}", path.display(), i + 2);
                    match record {
                        Ok(r) => match (r.get(text_column), r.get(label_column)) {
                            (Some(t), Some(l)) if !l.trim().is_empty() => examples.push(Example {
                                text: t.to_string(),
                                label: l.trim().to_string(),
                                origin,
                            }),
                            _ => problem(origin, "missing text or label".into())?,
                        },
                        Err(e) => problem(origin, format!("malformed CSV: {e}"))?,
                    }
                }
            }
            _ => {
                for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                    let origin = format!("{}:{}", path.display(), i + 1);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    match parse_json_line(line) {
                        Ok((text, label)) => examples.push(Example {
                            text,
                            label,
                            origin,
                        }),
                        Err(message) => problem(origin, message)?,
                    }
                }
            }
        }
    }
    if examples.is_empty() {
        return Err(Error::file(path, "no examples (the dataset is empty)"));
    }
    Ok((examples, skipped))
}

fn parse_json_line(line: &[u8]) -> std::result::Result<(String, String), String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not valid UTF-8: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let body = value
        .get("text")
        .and_then(|t| t.as_str())
        .ok_or("no string field `text`")?;
    let label = match value.get("label") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::Bool(b)) => b.to_string(),
        _ => return Err("no `label` (a string or a number)".into()),
    };
    Ok((body.to_string(), label))
}

/// `folder/LABEL/*.txt`: the sub-folder names are the labels.
fn read_folder(dir: &Path, examples: &mut Vec<Example>) -> Result<()> {
    let mut labels: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    labels.sort();
    for label_dir in labels {
        let label = label_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&label_dir)
            .map_err(|e| Error::io(&label_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
            examples.push(Example {
                text: String::from_utf8_lossy(&bytes).into_owned(),
                label: label.clone(),
                origin: file.display().to_string(),
            });
        }
    }
    Ok(())
}
