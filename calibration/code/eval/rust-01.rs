//! Parse simple `key = value` INI-style configuration with sections.
//!
//! Lines starting with `#` or `;` are comments.  Keys outside any section
//! go into the "" (global) section.

use std::collections::BTreeMap;

#[derive(Debug)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

pub type Section = BTreeMap<String, String>;

pub fn parse(text: &str) -> Result<BTreeMap<String, Section>, ParseError> {
    let mut out: BTreeMap<String, Section> = BTreeMap::new();
    let mut current = String::new();
    out.insert(current.clone(), Section::new());

    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.strip_suffix(']').ok_or_else(|| ParseError {
                line: line_no,
                message: "section header is missing ']'".into(),
            })?;
            current = name.trim().to_string();
            out.entry(current.clone()).or_default();
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| ParseError {
            line: line_no,
            message: format!("expected key = value, got {line:?}"),
        })?;
        let value = value.trim().trim_matches('"');
        out.get_mut(&current)
            .expect("current section always exists")
            .insert(key.trim().to_string(), value.to_string());
    }
    Ok(out)
}

fn main() {
    let text = r#"
# global settings
verbose = true

[server]
host = "0.0.0.0"
port = 8080

[database]
url = postgres://localhost/app
"#;
    match parse(text) {
        Ok(cfg) => {
            for (section, kv) in &cfg {
                for (k, v) in kv {
                    println!("{:>10} {:<8} = {}", section, k, v);
                }
            }
            let port: u16 = cfg["server"]["port"].parse().unwrap_or(80);
            println!("port as number: {port}");
        }
        Err(e) => eprintln!("line {}: {}", e.line, e.message),
    }
}
