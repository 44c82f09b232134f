//! `pmivmm mon --node N`: the cluster as node N sees it, live (openMosix's
//! mosmon): members with their state and load, the balancer, migrations in
//! flight, refreshed from the node's control socket every interval.
//!
//! On a terminal it is a full-screen ratatui view (q, Esc or Ctrl-C quit; the
//! terminal is restored on the way out, also after an error or a panic).
//! Otherwise (a pipe, a log file) it prints the `pmivmm cluster` table once
//! per interval. [`draw`] is a pure function of what it shows.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};
use ratatui::Frame;

use crate::cluster::membership::{Health, MemberView};
use crate::cluster::ClusterView;
use crate::commands::cluster::describe;
use crate::control;
use crate::rundir::NodePaths;

/// Width of the load bar, in cells.
const BAR_WIDTH: usize = 12;

/// What the view shows.
#[derive(Debug, Clone)]
pub struct Screen {
    /// The node asked.
    pub node: String,
    /// Its last answer (kept on screen while a refresh fails).
    pub view: Option<ClusterView>,
    /// Why the last refresh failed.
    pub error: Option<String>,
    pub interval: Duration,
}

/// `pmivmm mon --node NAME --interval MS`.
pub fn run(name: &str, interval: Duration) -> anyhow::Result<()> {
    let paths = NodePaths::existing(name)?;
    if !io::stdout().is_terminal() {
        return log(name, &paths, interval);
    }
    // Fail before taking over the terminal if the node does not answer.
    let first = control::cluster(&paths.control())?;
    let mut screen = Screen { node: name.to_owned(), view: Some(first), error: None, interval };
    let _restore = Restore; // dropped after `terminal`, also if try_init fails half-way
    let mut terminal = ratatui::try_init()?; // raw mode, alternate screen, panic hook that restores
    loop {
        terminal.draw(|f| draw(f, &screen))?;
        let deadline = Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            match event::read()? {
                Event::Key(k) if quits(&k) => return Ok(()),
                Event::Resize(..) => {
                    terminal.draw(|f| draw(f, &screen))?;
                }
                _ => {}
            }
        }
        match control::cluster(&paths.control()) {
            Ok(v) => {
                screen.view = Some(v);
                screen.error = None;
            }
            Err(e) if !paths.dir.exists() => screen.error = Some(format!("node {name} has stopped ({e})")),
            Err(e) => screen.error = Some(e.to_string()),
        }
    }
}

/// Puts the terminal back when `run` returns, whichever way.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
        let _ = crossterm::execute!(io::stdout(), crossterm::cursor::Show);
    }
}

/// q, Esc, Ctrl-C.
fn quits(k: &KeyEvent) -> bool {
    k.kind == KeyEventKind::Press
        && matches!(
            (k.code, k.modifiers.contains(KeyModifiers::CONTROL)),
            (KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc, false) | (KeyCode::Char('c'), true)
        )
}

/// Not a terminal: the `pmivmm cluster` table every interval, with the time.
fn log(name: &str, paths: &NodePaths, interval: Duration) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    loop {
        let started = Instant::now();
        let stamp = utc_time(SystemTime::now());
        match control::cluster(&paths.control()) {
            Ok(v) => write!(out, "--- {name} at {stamp} UTC\n{}", describe(&v))?,
            Err(e) if !paths.dir.exists() => anyhow::bail!("node {name} has stopped ({e})"),
            Err(e) => writeln!(out, "--- {name} at {stamp} UTC\nerror: {e}")?,
        }
        out.flush()?;
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// HH:MM:SS.mmm of `t` in UTC.
fn utc_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600 % 24, s / 60 % 60, s % 60, d.subsec_millis())
}

/// Runnable tasks per CPU as a bar, full at one per CPU, and the figure.
pub fn load_bar(runnable: u32, cpus: u32, width: usize) -> String {
    let per_cpu = f64::from(runnable) / f64::from(cpus.max(1));
    let filled = ((per_cpu.min(1.0) * width as f64).round() as usize).min(width);
    format!("{}{} {per_cpu:.2}", "█".repeat(filled), "░".repeat(width - filled))
}

fn load_color(runnable: u32, cpus: u32) -> Color {
    let per_cpu = f64::from(runnable) / f64::from(cpus.max(1));
    if per_cpu >= 1.0 {
        Color::Red
    } else if per_cpu >= 0.5 {
        Color::Yellow
    } else {
        Color::Green
    }
}

/// The words of a member's STATE column, and their colour.
pub fn member_state(m: &MemberView) -> (String, Color) {
    let (mut s, c) = match m.health {
        Health::Alive => ("alive".to_owned(), Color::Green),
        Health::Suspect => ("suspect".to_owned(), Color::Yellow),
    };
    if m.member.blocked {
        s.push_str(", blocked");
    }
    (s, if m.member.blocked && m.health == Health::Alive { Color::Magenta } else { c })
}

fn member_row(m: &MemberView) -> Row<'static> {
    let (state, color) = member_state(m);
    let l = m.member.load;
    let name = format!("{}{}", m.member.name, if m.me { " *" } else { "" });
    let row = Row::new(vec![
        Cell::from(name),
        Cell::from(m.member.addr.clone()),
        Cell::from(state).style(Style::new().fg(color)),
        Cell::from(l.runnable.to_string()),
        Cell::from(l.cpus.to_string()),
        Cell::from(format!("{}%", l.cpu_percent)),
        Cell::from(format!("{} MiB", l.mem_free_mib)),
        Cell::from(load_bar(l.runnable, l.cpus, BAR_WIDTH)).style(Style::new().fg(load_color(l.runnable, l.cpus))),
    ]);
    if m.me {
        row.style(Style::new().add_modifier(Modifier::BOLD))
    } else {
        row
    }
}

/// The lines of the balancer pane.
pub fn balancer_lines(v: &ClusterView) -> Vec<Line<'static>> {
    let pinned = if v.pinned.is_empty() {
        "none".to_owned()
    } else {
        v.pinned.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
    };
    let (on, color) = if v.auto_balance { ("on", Color::Green) } else { ("off", Color::Yellow) };
    let mut lines = vec![Line::from(vec![
        Span::raw("automatic balancing: "),
        Span::styled(on, Style::new().fg(color).add_modifier(Modifier::BOLD)),
        Span::raw(format!("   automatic migrations: {}   pinned here: {pinned}", v.auto_migrations)),
    ])];
    if v.in_flight.is_empty() {
        lines.push(Line::from("no migrations in flight"));
    } else {
        lines.push(Line::from(format!("{} migration(s) in flight:", v.in_flight.len())));
        for f in &v.in_flight {
            lines.push(Line::from(vec![
                Span::styled(format!("  PID {} {}", f.pid, f.comm), Style::new().add_modifier(Modifier::BOLD)),
                Span::raw(format!(" -> {}", f.target)),
                Span::raw(if f.automatic { " (balancer)" } else { " (by hand)" }),
            ]));
        }
    }
    lines
}

/// Draws `screen` on the whole frame.
pub fn draw(frame: &mut Frame, screen: &Screen) {
    let empty = ClusterView { members: vec![], in_flight: vec![], pinned: vec![], auto_balance: false, auto_migrations: 0 };
    let v = screen.view.as_ref().unwrap_or(&empty);
    let balancer = balancer_lines(v);
    let [title, members, bottom, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(balancer.len() as u16 + 2),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let alive = v.members.iter().filter(|m| m.health == Health::Alive).count();
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("pmivmm mon", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!(
                "  cluster as {} sees it: {} member(s), {alive} alive; every {} ms",
                screen.node,
                v.members.len(),
                screen.interval.as_millis()
            )),
        ])),
        title,
    );

    let header = Row::new(["NODE", "ADDRESS", "STATE", "RUN", "CPUS", "CPU", "FREE", "LOAD (runnable/cpu)"])
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let widths = [
        Constraint::Length(10),
        Constraint::Length(21),
        Constraint::Length(16),
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Length(9),
        Constraint::Min(BAR_WIDTH as u16 + 5),
    ];
    frame.render_widget(
        Table::new(v.members.iter().map(member_row), widths)
            .header(header)
            .block(Block::bordered().title(" members ")),
        members,
    );
    frame.render_widget(Paragraph::new(balancer).block(Block::bordered().title(" balancer ")), bottom);

    let foot = match &screen.error {
        Some(e) => Line::from(Span::styled(format!("error: {e}"), Style::new().fg(Color::Red))),
        None => Line::from("q, Esc or Ctrl-C quits"),
    };
    frame.render_widget(Paragraph::new(foot), footer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::{Member, NodeLoad};
    use crate::cluster::InFlight;
    use ratatui::backend::TestBackend;
    use ratatui::buffer::Buffer;
    use ratatui::Terminal;

    fn member(name: &str, runnable: u32, health: Health, blocked: bool, me: bool) -> MemberView {
        MemberView {
            member: Member {
                name: name.into(),
                addr: format!("10.77.0.{}:7000", 10 + name.len()),
                heartbeat: 7,
                load: NodeLoad { runnable, cpus: 1, mem_free_mib: 200, cpu_percent: 37 },
                blocked,
            },
            health,
            silent_ms: 400,
            me,
        }
    }

    fn view() -> ClusterView {
        ClusterView {
            members: vec![
                member("lab1", 2, Health::Alive, false, true),
                member("lab2", 0, Health::Suspect, false, false),
                member("lab3", 1, Health::Alive, true, false),
            ],
            in_flight: vec![InFlight { pid: 42, comm: "burn".into(), target: "lab2".into(), automatic: true }],
            pinned: vec![7],
            auto_balance: true,
            auto_migrations: 3,
        }
    }

    fn text(buf: &Buffer) -> Vec<String> {
        let w = buf.area.width as usize;
        buf.content.chunks(w).map(|row| row.iter().map(|c| c.symbol()).collect::<String>()).collect()
    }

    fn render(screen: &Screen, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, screen)).unwrap();
        text(t.backend().buffer())
    }

    fn screen(view: Option<ClusterView>, error: Option<&str>) -> Screen {
        Screen { node: "lab1".into(), view, error: error.map(str::to_owned), interval: Duration::from_millis(500) }
    }

    fn row<'a>(lines: &'a [String], what: &str) -> &'a str {
        lines.iter().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no line with {what:?} in\n{}", lines.join("\n")))
    }

    #[test]
    fn members_balancer_and_flights() {
        let lines = render(&screen(Some(view()), None), 100, 16);
        let all = lines.join("\n");
        assert!(lines[0].contains("cluster as lab1 sees it: 3 member(s), 2 alive; every 500 ms"), "{all}");
        let lab1 = row(&lines, "lab1 *");
        assert!(lab1.contains("10.77.0.14:7000") && lab1.contains("alive") && lab1.contains(" 37% ") && lab1.contains("200 MiB"), "{all}");
        assert!(lab1.contains(&load_bar(2, 1, BAR_WIDTH)), "{all}");
        assert!(row(&lines, "lab2 ").contains("suspect"), "{all}");
        assert!(row(&lines, "lab3 ").contains("alive, blocked"), "{all}");
        assert!(all.contains("automatic balancing: on   automatic migrations: 3   pinned here: 7"), "{all}");
        assert!(all.contains("1 migration(s) in flight:"), "{all}");
        assert!(all.contains("PID 42 burn -> lab2 (balancer)"), "{all}");
        assert!(lines.last().unwrap().contains("q, Esc or Ctrl-C quits"), "{all}");
    }

    #[test]
    fn styles_follow_state_and_load() {
        let mut t = Terminal::new(TestBackend::new(100, 16)).unwrap();
        t.draw(|f| draw(f, &screen(Some(view()), None))).unwrap();
        let buf = t.backend().buffer().clone();
        let lines = text(&buf);
        let cell_of = |line: &str, word: &str| {
            let y = lines.iter().position(|l| l.contains(line)).unwrap();
            // Columns count cells, not bytes (the bars are multi-byte).
            let prefix = &lines[y][..lines[y].find(word).unwrap()];
            buf[(prefix.chars().count() as u16, y as u16)].clone()
        };
        assert_eq!(cell_of("lab2 ", "suspect").fg, Color::Yellow);
        assert_eq!(cell_of("lab1 *", "alive").fg, Color::Green);
        assert_eq!(cell_of("lab3 ", "alive, blocked").fg, Color::Magenta);
        assert_eq!(cell_of("lab1 *", "█").fg, Color::Red);
        assert!(cell_of("lab1 *", "lab1").modifier.contains(Modifier::BOLD));
    }

    #[test]
    fn errors_keep_the_last_view() {
        let lines = render(&screen(Some(view()), Some("node lab1 has stopped")), 100, 16);
        assert!(lines.iter().any(|l| l.contains("lab2")));
        assert!(lines.last().unwrap().contains("error: node lab1 has stopped"));
        let idle = ClusterView { in_flight: vec![], auto_balance: false, pinned: vec![], ..view() };
        let all = render(&screen(Some(idle), None), 100, 16).join("\n");
        assert!(all.contains("automatic balancing: off") && all.contains("pinned here: none"), "{all}");
        assert!(all.contains("no migrations in flight"), "{all}");
    }

    #[test]
    fn small_and_empty_screens_do_not_panic() {
        for (w, h) in [(100, 16), (20, 5), (1, 1), (200, 60)] {
            render(&screen(Some(view()), None), w, h);
            render(&screen(None, Some("cannot reach")), w, h);
        }
    }

    #[test]
    fn load_bars() {
        assert_eq!(load_bar(0, 2, 4), "░░░░ 0.00");
        assert_eq!(load_bar(1, 2, 4), "██░░ 0.50");
        assert_eq!(load_bar(5, 2, 4), "████ 2.50");
        assert_eq!(load_bar(1, 0, 4), "████ 1.00");
        assert_eq!(load_color(0, 1), Color::Green);
        assert_eq!(load_color(1, 2), Color::Yellow);
        assert_eq!(load_color(3, 2), Color::Red);
    }

    #[test]
    fn quit_keys() {
        let k = |code, m| KeyEvent::new(code, m);
        assert!(quits(&k(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&k(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(quits(&k(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&k(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&k(KeyCode::Char('x'), KeyModifiers::NONE)));
    }

    #[test]
    fn log_timestamps() {
        let t = UNIX_EPOCH + Duration::from_millis(86_400_000 * 3 + 3_723_045);
        assert_eq!(utc_time(t), "01:02:03.045");
    }
}
