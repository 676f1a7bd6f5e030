//! Markdown for people: the one table writer the isolation report and the audit bundle are
//! rendered with, from their types.

use std::fmt::Write;

/// A table cell: on one line, with the pipes that would split it escaped.
pub fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// Appends a table with `headers` and `rows` (each cell already made with [`cell`] or
/// known to hold no pipe).
pub fn table(out: &mut String, headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    let _ = writeln!(out, "| {} |", headers.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(headers.len()));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_can_not_break_its_table() {
        let mut out = String::new();
        table(
            &mut out,
            &["a", "b"],
            [vec![cell("x|y"), cell("two\nlines")]],
        );
        assert_eq!(out, "| a | b |\n|---|---|\n| x\\|y | two lines |\n");
    }
}
