//! The man page and the shell completions, generated from the clap
//! definitions so they never drift from `--help`.

use std::io::{self, Write};

use clap::CommandFactory as _;
use clap_mangen::roff::{bold, italic, roman, Roff};

use crate::cli::Args;

/// The record types of `--output json` (field by field in
/// docs/records.md), for the man page's RECORDS section.
pub const RECORD_TYPES: &[(&str, &str)] = &[
    (
        "transition",
        "one TCP state change of one socket (--events transitions|all)",
    ),
    (
        "close",
        "how a connection closed, as soon as its close handshake is over",
    ),
    (
        "connection",
        "a connection that ended: its time in every state, how it closed, its TIME_WAIT",
    ),
    (
        "close_wait",
        "a connection left in CLOSE_WAIT past --close-wait, with the processes and fds holding it",
    ),
    (
        "stuck",
        "a connection left in another closing state past its alert time",
    ),
    (
        "summary",
        "per-state time percentiles and histograms, closes by class (--summary, SIGUSR1, exit)",
    ),
    (
        "stats",
        "the last record: events seen, lost, skipped, dropped, and why",
    ),
];

/// Writes the man page: clap's sections, then RECORDS, EXIT STATUS and
/// SEE ALSO.
pub fn write_man(w: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(Args::command()).manual("tracer manual");
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;

    let mut roff = Roff::new();
    roff.control("SH", ["RECORDS"]);
    roff.text([roman(
        "With --output json every line is one JSON object whose \"type\" is one of:",
    )]);
    for (name, what) in RECORD_TYPES {
        roff.control("TP", []);
        roff.text([bold(*name)]);
        roff.text([roman(*what)]);
    }
    roff.control("PP", []);
    roff.text([
        roman("Every field is described in "),
        italic("docs/records.md"),
        roman(" and checked by the JSON Schema "),
        italic("docs/records.schema.json"),
        roman(" of the source repository."),
    ]);
    roff.control("SH", ["EXIT STATUS"]);
    roff.text([roman(
        "0 when tracing stopped normally (SIGINT, SIGTERM, --duration, a closed stdout); \
         1 on an error (missing privileges, a kernel without the tracepoint or BTF); \
         2 on bad command-line input.",
    )]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        roman("The README and docs/ of the source repository: "),
        italic("records.md"),
        roman(", "),
        italic("design.md"),
        roman(", "),
        italic("deployment.md"),
        roman(", "),
        italic("kernels.md"),
        roman(", "),
        italic("performance.md"),
        roman(". "),
        bold("ss"),
        roman("(8), "),
        bold("tcp"),
        roman("(7), "),
        bold("bpftool"),
        roman("(8)."),
    ]);
    roff.to_writer(w)?;
    man.render_version_section(w)
}

/// Writes the completion script for `shell`.
pub fn write_completions(shell: clap_complete::Shell, w: &mut dyn Write) {
    clap_complete::generate(shell, &mut Args::command(), "tracer", w);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn man() -> String {
        let mut out = Vec::new();
        write_man(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_man_page_lists_options_subcommands_and_every_record_type() {
        let page = man();
        assert!(page.starts_with(".ie"), "{}", &page[..80]);
        for section in [
            "NAME",
            "SYNOPSIS",
            "OPTIONS",
            "SUBCOMMANDS",
            "RECORDS",
            "EXIT STATUS",
            "SEE ALSO",
        ] {
            let quoted = format!(".SH \"{section}\"");
            assert!(
                page.contains(&format!(".SH {section}\n")) || page.contains(&quoted),
                "{section}"
            );
        }
        for flag in ["\\-\\-events", "\\-\\-summary", "\\-\\-close\\-wait"] {
            assert!(page.contains(flag), "{flag}");
        }
        for (name, _) in RECORD_TYPES {
            assert!(page.contains(&format!("\\fB{name}\\fR")), "{name}");
        }
        assert!(page.contains("docs/records.md"));
    }

    #[test]
    fn completions_know_the_flags() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            write_completions(shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("close-wait"), "{shell}");
            assert!(text.contains("summarize"), "{shell}");
        }
    }
}
