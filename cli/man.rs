//! The man pages, rendered from the definitions `--help` prints: queuectl(1), a page per command
//! (queuectl-dlq-retry(1) for `dlq retry`) and queuectld(8).
//!
//! clap_mangen renders each page's name, synopsis, description, options and commands. The paragraphs of a
//! command's `after_help` are read here: a heading followed by indented lines (`Examples:`, `Exit status:`)
//! becomes a section of that name, any other paragraph goes on the description. Every page has an EXIT STATUS and
//! an ENVIRONMENT section: its command's own, or else the generic exit status below and queuectl(1)'s environment.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Command, CommandFactory};
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

use crate::args::Cli;

/// The exit status of a command that gives none in its `after_help`: the commands that ask a server.
const EXIT_STATUS: &str = "\
Exit status:
  0  done
  1  the request failed; the message on stderr says why
  2  bad usage
  3  no server could be reached";

/// What roff needs once per page; clap_mangen writes it before each part it renders.
const PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// One man page: a command, the section of the manual it belongs to, and the commands above it.
struct Page {
    command: Command,
    section: &'static str,
    parents: Vec<Command>,
}

/// queuectl(1): what `queuectl man` prints.
pub fn main_page(out: &mut dyn Write) -> io::Result<()> {
    let cli = for_pages(Cli::command());
    let environment = own_sections(&cli).remove("ENVIRONMENT");
    let page = Page {
        command: cli,
        section: "1",
        parents: Vec::new(),
    };
    render(&page, environment.as_ref(), out)
}

/// Writes every page into `dir` as a man directory holds them (man1/, man8/) and returns their paths.
pub fn write_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let cli = for_pages(Cli::command());
    let environment = own_sections(&cli).remove("ENVIRONMENT");
    let mut pages = vec![Page {
        command: cli.clone(),
        section: "1",
        parents: Vec::new(),
    }];
    commands_of(&cli, &mut vec![cli.clone()], &mut pages);
    pages.push(Page {
        command: for_pages(queuectl::server_args::ServerArgs::command()),
        section: "8",
        parents: vec![cli],
    });

    let mut written = Vec::new();
    for page in pages {
        let folder = dir.join(format!("man{}", page.section));
        std::fs::create_dir_all(&folder)?;
        let path = folder.join(format!("{}.{}", page_name(&page.command), page.section));
        let mut text = Vec::new();
        render(&page, environment.as_ref(), &mut text)?;
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// `command` as its pages show it: built (so that each command knows its full name) and without the `help`
/// command, which has no page of its own.
fn for_pages(command: Command) -> Command {
    fn without_help(command: Command) -> Command {
        command
            .disable_help_subcommand(true)
            .mut_subcommands(without_help)
    }
    let mut command = without_help(command);
    command.build();
    command
}

/// A page for every command below `command` (the last of `parents`), depth first.
fn commands_of(command: &Command, parents: &mut Vec<Command>, pages: &mut Vec<Page>) {
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        pages.push(Page {
            command: sub.clone(),
            section: "1",
            parents: parents.clone(),
        });
        parents.push(sub.clone());
        commands_of(sub, parents, pages);
        parents.pop();
    }
}

/// The page's name: `queuectl-dlq-retry` for `queuectl dlq retry`.
fn page_name(command: &Command) -> &str {
    command
        .get_display_name()
        .unwrap_or_else(|| command.get_name())
}

/// One page: clap_mangen's parts, then the sections of the `after_help` (with `environment` when it has none),
/// then SEE ALSO.
fn render(page: &Page, environment: Option<&Section>, out: &mut dyn Write) -> io::Result<()> {
    let Page {
        command,
        section,
        parents,
    } = page;
    let section = *section;
    let name = page_name(command);
    let man = Man::new(command.clone()).section(section);
    let mut sections = own_sections(command);
    let mut page = Vec::new();
    // Written here: clap_mangen leaves out an empty date, which moves the source and the manual into its place.
    writeln!(
        page,
        ".TH {} {section} \"\" \"queuectl {}\" queuectl",
        name.to_uppercase(),
        env!("CARGO_PKG_VERSION")
    )?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    let mut roff = Roff::default();
    for paragraph in &sections.description {
        roff.control("PP", []);
        roff.text([roman(paragraph.join(" "))]);
    }
    roff.to_writer(&mut page)?;
    if command.get_arguments().any(|arg| !arg.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if command.get_subcommands().any(|sub| !sub.is_hide_set()) {
        man.render_subcommands_section(&mut page)?;
    }

    let exit_status = sections
        .remove("EXIT STATUS")
        .unwrap_or_else(|| parse(EXIT_STATUS).remove("EXIT STATUS").expect("a heading"));
    let own_environment = sections.remove("ENVIRONMENT");
    let examples = sections.remove("EXAMPLES");
    let mut roff = Roff::default();
    for section in &sections.named {
        section.render(&mut roff);
    }
    exit_status.render(&mut roff);
    if let Some(environment) = own_environment.as_ref().or(environment) {
        environment.render(&mut roff);
    }
    if let Some(examples) = examples {
        examples.render(&mut roff);
    }
    roff.control("SH", ["SEE ALSO"]);
    let mut see_also: Vec<String> = parents
        .iter()
        .map(|parent| format!("{}(1)", page_name(parent)))
        .collect();
    if section == "1" {
        see_also.push("queuectld(8)".to_owned());
    }
    roff.text([roman(see_also.join(", "))]);
    roff.to_writer(&mut page)?;

    // One preamble per page, not one per part.
    let page = String::from_utf8(page).expect("roff from UTF-8 text is UTF-8");
    let body = page.replace(PREAMBLE, "");
    let preamble = if body.len() < page.len() {
        PREAMBLE
    } else {
        ""
    };
    write!(out, "{preamble}{body}")
}

/// The sections of `command`'s `after_help`.
fn own_sections(command: &Command) -> Sections {
    command
        .get_after_long_help()
        .or_else(|| command.get_after_help())
        .map(|text| parse(&text.to_string()))
        .unwrap_or_default()
}

/// An `after_help`, read into the paragraphs of the description and named sections.
#[derive(Default)]
struct Sections {
    /// Paragraphs without a heading, each as its lines.
    description: Vec<Vec<String>>,
    named: Vec<Section>,
}

impl Sections {
    fn remove(&mut self, name: &str) -> Option<Section> {
        let index = self.named.iter().position(|section| section.name == name)?;
        Some(self.named.remove(index))
    }
}

/// A section from a paragraph such as "Exit status:\n  0  done\n  1  ...".
struct Section {
    /// Its heading in capitals, examples plural as man pages have them: EXIT STATUS, EXAMPLES.
    name: String,
    /// Its lines without the heading, as written.
    lines: Vec<String>,
}

fn parse(text: &str) -> Sections {
    let mut sections = Sections::default();
    for paragraph in text.split("\n\n") {
        let mut lines = paragraph.lines();
        let first = lines.next().unwrap_or_default();
        let rest: Vec<String> = lines.map(str::to_owned).collect();
        let heading = first
            .strip_suffix(':')
            .filter(|_| !first.starts_with(' '))
            .filter(|_| rest.first().is_some_and(|line| line.starts_with("  ")));
        match heading {
            Some(heading) => {
                let mut name = heading.to_uppercase();
                if name == "EXAMPLE" {
                    name.push('S');
                }
                sections.named.push(Section { name, lines: rest });
            }
            None => sections
                .description
                .push(paragraph.lines().map(str::to_owned).collect()),
        }
    }
    sections
}

impl Section {
    /// Examples line by line, as they are to be pasted; anything else as a list of terms ("0", "QUEUECTL_HOME")
    /// and what they mean, with any unindented lines after them as a paragraph.
    fn render(&self, roff: &mut Roff) {
        roff.control("SH", [self.name.as_str()]);
        if self.name == "EXAMPLES" {
            roff.control("nf", []);
            for line in &self.lines {
                roff.text([roman(line.strip_prefix("  ").unwrap_or(line))]);
            }
            roff.control("fi", []);
            return;
        }
        let mut items: Vec<(&str, String)> = Vec::new();
        let mut after = Vec::new();
        for line in &self.lines {
            let Some(indented) = line.strip_prefix("  ") else {
                after.push(line.as_str());
                continue;
            };
            match (indented.starts_with(' '), items.last_mut()) {
                (true, Some((_, meaning))) => {
                    meaning.push(' ');
                    meaning.push_str(indented.trim());
                }
                _ => {
                    let (term, meaning) = indented.split_once("  ").unwrap_or((indented, ""));
                    items.push((term, meaning.trim().to_owned()));
                }
            }
        }
        for (term, meaning) in items {
            roff.control("TP", []);
            roff.text([bold(term)]);
            roff.text([roman(meaning)]);
        }
        if !after.is_empty() {
            roff.control("PP", []);
            roff.text([roman(after.join(" "))]);
        }
    }
}
