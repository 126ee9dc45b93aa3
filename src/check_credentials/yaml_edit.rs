//! Setting one key of a Secret in the text of a YAML stream: only that value is edited in place
//! (comments, order and the other documents are kept byte for byte), else that one document is
//! re-serialized; the result is verified by parsing it back.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;

use super::manifests::{documents, kind_of, name_of};

/// The result of editing a Secret file's text.
#[derive(Debug)]
pub(super) struct Edit {
    pub(super) text: String,
    /// True when only the key's value changed; false when the document had to be re-serialized.
    pub(super) in_place: bool,
}

/// Sets `key` of Secret `secret_name` in a (multi-document) YAML text: in place in `stringData`
/// and/or `data` (base64) wherever the key is, keeping everything else byte for byte; if the layout
/// is too unusual for that (flow mappings, JSON), re-serializes that one document. The result is
/// verified by parsing it back.
pub(super) fn update_secret_text(
    text: &str,
    secret_name: &str,
    key: &str,
    value: &str,
) -> Result<Edit, String> {
    let docs = split_documents(text);
    let secrets: Vec<usize> = docs
        .iter()
        .enumerate()
        .filter(|(_, d)| {
            documents(&d.body(text))
                .ok()
                .and_then(|v| v.into_iter().next())
                .is_some_and(|v| kind_of(&v) == Some("Secret"))
        })
        .map(|(i, _)| i)
        .collect();
    let index = secrets
        .iter()
        .copied()
        .find(|i| {
            documents(&docs[*i].body(text))
                .ok()
                .and_then(|v| v.into_iter().next())
                .is_some_and(|v| name_of(&v) == Some(secret_name))
        })
        .or_else(|| (secrets.len() == 1).then(|| secrets[0]))
        .ok_or_else(|| format!("no Secret named {secret_name} in the file"))?;
    let doc = &docs[index];
    let body = doc.body(text);
    let before = secret_values(&body)?;

    let (new_body, in_place) = match edit_in_place(&body, key, value) {
        Some(edited) if verify(&edited, &before, key, value) => (edited, true),
        _ => {
            let reserialized = reserialize(&body, key, value)?;
            if !verify(&reserialized, &before, key, value) {
                return Err("the edited Secret did not read back as expected".into());
            }
            (reserialized, false)
        }
    };
    let mut out = String::with_capacity(text.len() + 64);
    out.push_str(&text[..doc.body_start]);
    out.push_str(&new_body);
    out.push_str(&text[doc.end..]);
    Ok(Edit { text: out, in_place })
}

/// A document of a YAML stream: `start..end` in bytes, the body after its `---` line (if any).
struct Doc {
    body_start: usize,
    end: usize,
}

impl Doc {
    fn body(&self, text: &str) -> String {
        text[self.body_start..self.end].to_string()
    }
}

fn is_separator(line: &str) -> bool {
    let line = line.trim_end_matches(['\r', '\n']);
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t") || line == "..."
}

fn split_documents(text: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    let mut offset = 0;
    let mut body_start = 0;
    for line in text.split_inclusive('\n') {
        if is_separator(line) {
            if offset > 0 || !docs.is_empty() {
                docs.push(Doc {
                    body_start,
                    end: offset,
                });
            }
            body_start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(Doc {
        body_start,
        end: text.len(),
    });
    docs
}

/// Effective string values of a Secret document (stringData over data).
fn secret_values(body: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let secret: Secret = serde_saphyr::from_str(body).map_err(|e| format!("invalid Secret: {e}"))?;
    let mut values: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in secret.string_data.unwrap_or_default() {
        values.insert(k, v.into_bytes());
    }
    Ok(values)
}

fn verify(body: &str, before: &BTreeMap<String, Vec<u8>>, key: &str, value: &str) -> bool {
    let Ok(after) = secret_values(body) else {
        return false;
    };
    let mut expected = before.clone();
    expected.insert(key.to_string(), value.as_bytes().to_vec());
    after == expected
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank_or_comment(line: &str) -> bool {
    let trimmed = line.trim();
    trimmed.is_empty() || trimmed.starts_with('#')
}

fn line_ending(line: &str) -> &str {
    if line.ends_with("\r\n") {
        "\r\n"
    } else if line.ends_with('\n') {
        "\n"
    } else {
        ""
    }
}

/// Splits `key: value` (key plain or quoted) into (key text as written, rest after the colon).
fn split_key(content: &str) -> Option<(&str, &str, String)> {
    let (key_text, key) = if let Some(rest) = content.strip_prefix('"') {
        let end = rest.find('"')?;
        (&content[..end + 2], rest[..end].to_string())
    } else if let Some(rest) = content.strip_prefix('\'') {
        let end = rest.find('\'')?;
        (&content[..end + 2], rest[..end].to_string())
    } else {
        let end = content.find(':')?;
        (&content[..end], content[..end].trim_end().to_string())
    };
    let after = content[key_text.len()..].trim_start_matches(' ');
    let value = after.strip_prefix(':')?;
    if !(value.is_empty() || value.starts_with([' ', '\t', '\r', '\n'])) {
        return None;
    }
    Some((key_text.trim_end(), value, key))
}

/// The ` # comment` after a single-line scalar value, if any (kept when the value is replaced).
fn trailing_comment(value: &str) -> &str {
    let v = value.trim_end_matches(['\r', '\n']);
    let trimmed = v.trim_start();
    let offset = v.len() - trimmed.len();
    let after_scalar = if let Some(rest) = trimmed.strip_prefix('"') {
        let mut escaped = false;
        let mut end = None;
        for (i, c) in rest.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        match end {
            Some(i) => offset + 1 + i + 1,
            None => return "",
        }
    } else if let Some(rest) = trimmed.strip_prefix('\'') {
        match rest.find('\'') {
            Some(i) => offset + 1 + i + 1,
            None => return "",
        }
    } else {
        match v.find(" #") {
            Some(i) => i,
            None => return "",
        }
    };
    let rest = &v[after_scalar..];
    if rest.trim_start().starts_with('#') {
        rest
    } else {
        ""
    }
}

/// Edits the key's value in `stringData` and/or `data` blocks; `None` if the layout is not a plain
/// block mapping or the key was not found.
fn edit_in_place(body: &str, key: &str, value: &str) -> Option<String> {
    let lines: Vec<&str> = body.split_inclusive('\n').collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut edited = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        out.push(line.to_string());
        i += 1;
        if indentation(line) != 0 || is_blank_or_comment(line) {
            continue;
        }
        let Some((_, rest, section)) = split_key(line) else {
            continue;
        };
        let encode: fn(&str) -> String = match section.as_str() {
            "stringData" => |v| serde_json::to_string(v).expect("a string serializes"),
            "data" => |v| base64::engine::general_purpose::STANDARD.encode(v.as_bytes()),
            _ => continue,
        };
        let rest = rest.trim();
        if !(rest.is_empty() || rest.starts_with('#')) {
            // Flow mapping (`data: {…}`) or something else: not edited in place.
            return None;
        }
        // The block: following lines that are blank, comments, or indented.
        let mut child_indent = None;
        while i < lines.len() {
            let line = lines[i];
            if !is_blank_or_comment(line) && indentation(line) == 0 {
                break;
            }
            if is_blank_or_comment(line) {
                out.push(line.to_string());
                i += 1;
                continue;
            }
            let indent = *child_indent.get_or_insert(indentation(line));
            if indentation(line) != indent {
                out.push(line.to_string());
                i += 1;
                continue;
            }
            let content = &line[indent..];
            match split_key(content) {
                Some((key_text, old_value, name)) if name == key => {
                    let comment = trailing_comment(old_value);
                    let comment = if comment.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", comment.trim_start())
                    };
                    out.push(format!(
                        "{}{key_text}: {}{comment}{}",
                        " ".repeat(indent),
                        encode(value),
                        line_ending(line)
                    ));
                    edited = true;
                    i += 1;
                    // Drop the old value's continuation lines (block scalars, multi-line strings).
                    while i < lines.len() && (indentation(lines[i]) > indent || lines[i].trim().is_empty()) {
                        if lines[i].trim().is_empty() {
                            // Keep blank lines that end the block rather than belong to the value.
                            let next_is_deeper = lines[i + 1..]
                                .iter()
                                .find(|l| !l.trim().is_empty())
                                .is_some_and(|l| indentation(l) > indent);
                            if !next_is_deeper {
                                break;
                            }
                        }
                        i += 1;
                    }
                }
                _ => {
                    out.push(line.to_string());
                    i += 1;
                }
            }
        }
    }
    edited.then(|| out.concat())
}

/// Fallback: parse the document, set the key where it is (stringData and/or data), serialize it.
fn reserialize(body: &str, key: &str, value: &str) -> Result<String, String> {
    let mut doc: serde_json::Value =
        serde_saphyr::from_str(body).map_err(|e| format!("invalid YAML: {e}"))?;
    let mut set = false;
    if let Some(map) = doc.get_mut("stringData").and_then(|m| m.as_object_mut())
        && map.contains_key(key)
    {
        map.insert(key.into(), value.into());
        set = true;
    }
    if let Some(map) = doc.get_mut("data").and_then(|m| m.as_object_mut())
        && map.contains_key(key)
    {
        map.insert(
            key.into(),
            base64::engine::general_purpose::STANDARD
                .encode(value.as_bytes())
                .into(),
        );
        set = true;
    }
    if !set {
        return Err(format!("the Secret has no key {key} to update"));
    }
    serde_saphyr::to_string(&doc).map_err(|e| format!("cannot serialize the Secret: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &str = "# A Salesforce org.\n# Replace the placeholders.\napiVersion: v1\nkind: Secret\nmetadata:\n  name: acme-creds   # the credentials\ntype: Opaque\nstringData:\n  client_id: \"3MVG9-key\"\n  refresh_token: \"old-token\"   # from the OAuth flow\n  client_secret: 'shh'\n---\napiVersion: crmconnect.io/v1alpha1\nkind: Connection\nmetadata:\n  name: acme\nspec:\n  team: sales\n  provider: SalesforceProduction\n  credentialsSecretRef:\n    name: acme-creds\n";

    #[test]
    fn string_data_value_is_edited_in_place_keeping_everything_else() {
        let edit = update_secret_text(MULTI, "acme-creds", "refresh_token", "new-token").unwrap();
        assert!(edit.in_place);
        let expected = MULTI.replace(
            "  refresh_token: \"old-token\"   # from the OAuth flow\n",
            "  refresh_token: \"new-token\" # from the OAuth flow\n",
        );
        assert_eq!(edit.text, expected);
    }

    #[test]
    fn data_value_is_base64_and_other_secrets_are_untouched() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let text = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: other\ndata:\n  refresh_token: {}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: mine\ndata:\n  client_id: {}\n  refresh_token: {}\n",
            b64("other-token"),
            b64("cid"),
            b64("old-token")
        );
        let edit = update_secret_text(&text, "mine", "refresh_token", "new+token/x").unwrap();
        assert!(edit.in_place);
        let expected = text.replacen(
            &format!("  refresh_token: {}\n", b64("old-token")),
            &format!("  refresh_token: {}\n", b64("new+token/x")),
            1,
        );
        assert_eq!(edit.text, expected);
        assert!(edit.text.contains(&b64("other-token")));
    }

    #[test]
    fn key_in_both_data_and_string_data_is_updated_in_both() {
        let text = "kind: Secret\napiVersion: v1\nmetadata:\n  name: s\ndata:\n  refresh_token: b2xk\nstringData:\n  refresh_token: old\n";
        let edit = update_secret_text(text, "s", "refresh_token", "new").unwrap();
        assert_eq!(
            edit.text,
            "kind: Secret\napiVersion: v1\nmetadata:\n  name: s\ndata:\n  refresh_token: bmV3\nstringData:\n  refresh_token: \"new\"\n"
        );
    }

    #[test]
    fn block_scalar_values_and_crlf_are_handled() {
        let text = "kind: Secret\r\napiVersion: v1\r\nmetadata:\r\n  name: s\r\nstringData:\r\n  refresh_token: |\r\n    old-token\r\n\r\n  client_id: cid\r\n";
        let edit = update_secret_text(text, "s", "refresh_token", "new-token").unwrap();
        assert!(edit.in_place);
        assert_eq!(
            edit.text,
            "kind: Secret\r\napiVersion: v1\r\nmetadata:\r\n  name: s\r\nstringData:\r\n  refresh_token: \"new-token\"\r\n\r\n  client_id: cid\r\n"
        );
    }

    #[test]
    fn tokens_needing_escapes_read_back_exactly() {
        let text = "kind: Secret\napiVersion: v1\nmetadata:\n  name: s\nstringData:\n  refresh_token: old\n";
        let value = "a\"b\\c: #d";
        let edit = update_secret_text(text, "s", "refresh_token", value).unwrap();
        assert!(edit.in_place);
        assert_eq!(
            secret_values(&edit.text).unwrap()["refresh_token"],
            value.as_bytes()
        );
    }

    #[test]
    fn flow_mappings_fall_back_to_reserializing_that_document_only() {
        let text = "# keep me\nkind: Connection\nmetadata: {name: c}\n---\nkind: Secret\napiVersion: v1\nmetadata: {name: s}\nstringData: {refresh_token: old, client_id: cid}\n";
        let edit = update_secret_text(text, "s", "refresh_token", "new").unwrap();
        assert!(!edit.in_place);
        assert!(
            edit.text
                .starts_with("# keep me\nkind: Connection\nmetadata: {name: c}\n---\n"),
            "{}",
            edit.text
        );
        let (_, second) = edit.text.split_once("---\n").unwrap();
        let values = secret_values(second).unwrap();
        assert_eq!(values["refresh_token"], b"new");
        assert_eq!(values["client_id"], b"cid");
    }

    #[test]
    fn missing_secret_is_an_error() {
        assert!(
            update_secret_text(MULTI, "nope", "refresh_token", "x").is_ok(),
            "the only Secret is used"
        );
        let two = format!(
            "{MULTI}---\nkind: Secret\napiVersion: v1\nmetadata:\n  name: b\nstringData:\n  refresh_token: y\n"
        );
        assert!(update_secret_text(&two, "nope", "refresh_token", "x").is_err());
    }

    #[test]
    fn trailing_comments_are_found() {
        assert_eq!(trailing_comment(" \"a # b\"  # c\n"), "  # c");
        assert_eq!(trailing_comment(" 'a'# c"), "# c");
        assert_eq!(trailing_comment(" plain # c"), " # c");
        assert_eq!(trailing_comment(" plain#notacomment"), "");
        assert_eq!(trailing_comment(" \"unterminated"), "");
    }
}
