//! Table names as SQL writes them: `schema.table`, each part unquoted (folded to lower case, as
//! PostgreSQL folds) or in double quotes (kept exactly; `""` stands for one quote).

use std::fmt;

/// `schema.table` of a captured source table, as the catalog spells it (unquoted, case kept).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`); None when it is not a table name.
    pub fn parse(entry: &str) -> Option<TableName> {
        let mut rest = entry.trim();
        let mut parts = Vec::new();
        loop {
            let (part, after) = identifier(rest)?;
            parts.push(part);
            rest = after.trim_start();
            match rest.strip_prefix('.') {
                Some(next) => rest = next.trim_start(),
                None if rest.is_empty() => break,
                None => return None,
            }
        }
        let mut parts = parts.into_iter();
        let (schema, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => ("public".to_string(), name),
            (Some(schema), Some(name), None) => (schema, name),
            _ => return None,
        };
        // PostgreSQL would cut a longer name to 63 bytes: refused rather than guessed.
        let fits = |s: &str| !s.is_empty() && s.len() <= 63 && !s.contains('\0');
        (fits(&schema) && fits(&name)).then_some(TableName { schema, name })
    }
}

/// One identifier at the start of `text` and what follows it.
fn identifier(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, ch)) = chars.next() {
            if ch != '"' {
                out.push(ch);
                continue;
            }
            let after = &quoted[i + 1..];
            if after.starts_with('"') {
                out.push('"');
                chars.next();
            } else {
                return Some((out, after));
            }
        }
        // No closing quote.
        return None;
    }
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(text.len());
    let (word, after) = text.split_at(end);
    let first = word.chars().next()?;
    if !(first.is_alphabetic() || first == '_') {
        return None;
    }
    // PostgreSQL folds ASCII letters of unquoted names only.
    Some((word.to_ascii_lowercase(), after))
}

/// `name` as SQL must write it: bare when PostgreSQL would read it back unchanged, else quoted.
pub fn sql_ident(name: &str) -> String {
    let bare = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// As SQL writes it, e.g. `public.orders` or `"Sales Data"."Orders.2024"`.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", sql_ident(&self.schema), sql_ident(&self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entry: &str) -> Option<(String, String)> {
        TableName::parse(entry).map(|t| (t.schema, t.name))
    }

    fn pair(schema: &str, name: &str) -> Option<(String, String)> {
        Some((schema.into(), name.into()))
    }

    #[test]
    fn unquoted_parts_fold_to_lower_case() {
        assert_eq!(parse("orders"), pair("public", "orders"));
        assert_eq!(parse("Shop.Orders"), pair("shop", "orders"));
        assert_eq!(parse(" shop . orders "), pair("shop", "orders"));
        assert_eq!(parse("_t$1"), pair("public", "_t$1"));
        // Only ASCII letters fold, as in PostgreSQL with UTF8.
        assert_eq!(parse("Ärger"), pair("public", "Ärger"));
    }

    #[test]
    fn quoted_parts_keep_case_dots_spaces_and_quotes() {
        assert_eq!(
            parse(r#""Sales Data"."Orders.2024""#),
            pair("Sales Data", "Orders.2024")
        );
        assert_eq!(parse(r#""MixedCase""#), pair("public", "MixedCase"));
        assert_eq!(parse(r#"sales."Say ""hi""""#), pair("sales", r#"Say "hi""#));
        assert_eq!(parse(r#""a.b".c"#), pair("a.b", "c"));
    }

    #[test]
    fn what_is_not_a_table_name() {
        for bad in [
            "",
            "a.b.c",
            r#""unclosed"#,
            r#""""#,
            "1abc",
            "my-table",
            "a b",
            "a.",
            ".a",
            r#""a"b"#,
            "x".repeat(64).as_str(),
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(parse(&"x".repeat(63)).map(|p| p.1.len()), Some(63));
    }

    #[test]
    fn display_writes_what_parses_back() {
        for entry in [
            r#""Sales Data"."Orders.2024""#,
            "public.orders",
            r#"s."Say ""hi""""#,
        ] {
            let t = TableName::parse(entry).unwrap();
            assert_eq!(t.to_string(), entry);
            assert_eq!(TableName::parse(&t.to_string()), Some(t));
        }
        assert_eq!(sql_ident("Orders"), r#""Orders""#);
        assert_eq!(sql_ident("t$"), r#""t$""#);
    }
}
