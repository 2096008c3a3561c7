//! `tracer top`'s screen, drawn with ratatui from the [`Model`]: states and
//! closes side by side, the CLOSE_WAIT holders, TIME_WAIT by destination,
//! and a status line with the loss counters and the keys.

use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Table},
    Frame,
};

use super::model::{age, Model};

/// The smallest screen the view fits in.
pub const MIN_WIDTH: u16 = 80;
pub const MIN_HEIGHT: u16 = 24;

/// What the keyboard is typing into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Input {
    #[default]
    Keys,
    /// After `/`: the filter being typed.
    Filter(String),
}

/// The one line shown instead of the view on a screen too small for it.
pub fn too_small(width: u16, height: u16) -> String {
    format!(
        "terminal too small ({width}x{height}): tracer top needs at least {MIN_WIDTH}x{MIN_HEIGHT}"
    )
}

pub fn draw(f: &mut Frame, model: &Model, input: &Input) {
    let area = f.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        f.render_widget(Paragraph::new(too_small(area.width, area.height)), area);
        return;
    }
    let [title, top, holders, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(13),
        Constraint::Min(5),
        Constraint::Length(1),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(title_line(model)), title);
    let [states, closes, tw] = Layout::horizontal([
        Constraint::Length(29),
        Constraint::Length(28),
        Constraint::Min(21),
    ])
    .areas(top);
    draw_states(f, model, states);
    draw_closes(f, model, closes);
    draw_time_wait(f, model, tw);
    draw_close_wait(f, model, holders);
    f.render_widget(Paragraph::new(status_line(model, input)), status);
}

fn title_line(model: &Model) -> Line<'static> {
    let filter = model.filter.as_ref().map_or("-".into(), |f| f.text());
    let paused = match (model.has_data(), model.paused) {
        // Until the agent's first snapshot (it is loading the program).
        (false, _) => "  (starting)",
        (true, true) => "  PAUSED",
        (true, false) => "",
    };
    Line::from(format!(
        "tracer top  sort: {}  filter: {}{}    q quit  s sort  / filter  p pause",
        model.sort.name(),
        filter,
        paused
    ))
    .style(Style::default().add_modifier(Modifier::BOLD))
}

fn header(cells: &[&'static str]) -> Row<'static> {
    Row::new(cells.to_vec()).style(Style::default().add_modifier(Modifier::REVERSED))
}

fn draw_states(f: &mut Frame, model: &Model, area: Rect) {
    let rows = model.states().into_iter().map(|l| {
        Row::new(vec![
            l.state.name().to_string(),
            l.now.to_string(),
            format!("{:.1}", l.per_sec),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(12),
            Constraint::Length(6),
            Constraint::Length(7),
        ],
    )
    .header(header(&["STATE", "NOW", "IN/S"]))
    .block(Block::default().borders(Borders::ALL).title("Connections"));
    f.render_widget(table, area);
}

fn draw_closes(f: &mut Frame, model: &Model, area: Rect) {
    let (classes, sent, received) = model.closes();
    let mut rows: Vec<Row> = classes
        .into_iter()
        .map(|(by, rate)| Row::new(vec![by.name().to_string(), format!("{rate:.1}")]))
        .collect();
    rows.push(Row::new(vec![
        "resets out/in".to_string(),
        format!("{sent:.1} / {received:.1}"),
    ]));
    let table = Table::new(rows, [Constraint::Length(14), Constraint::Length(11)])
        .header(header(&["CLOSED BY", "PER S"]))
        .block(Block::default().borders(Borders::ALL).title("Closes"));
    f.render_widget(table, area);
}

fn draw_close_wait(f: &mut Frame, model: &Model, area: Rect) {
    let all = model.close_wait();
    let title = format!("CLOSE_WAIT holders ({})", all.len());
    let rows = all.into_iter().map(|r| {
        let fd = match (r.fd, r.more_holders) {
            (None, _) => "-".to_string(),
            (Some(fd), 0) => fd.to_string(),
            (Some(fd), n) => format!("{fd} +{n}"),
        };
        Row::new(vec![
            age(r.age_ns),
            r.pid.map_or("-".into(), |p| p.to_string()),
            r.comm.clone(),
            fd,
            r.lport.to_string(),
            format!("{}:{}", r.raddr, r.rport),
            r.container.clone(),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(15),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(21),
            Constraint::Min(10),
        ],
    )
    .header(header(&[
        "AGE",
        "PID",
        "COMM",
        "FD",
        "LPORT",
        "REMOTE",
        "CONTAINER",
    ]))
    .block(Block::default().borders(Borders::ALL).title(title));
    f.render_widget(table, area);
}

fn draw_time_wait(f: &mut Frame, model: &Model, area: Rect) {
    let rows = model.time_wait().into_iter().map(|r| {
        Row::new(vec![
            format!("{}:{}", r.raddr, r.rport),
            r.count.to_string(),
        ])
    });
    let table = Table::new(rows, [Constraint::Min(13), Constraint::Length(5)])
        .header(header(&["DESTINATION", "COUNT"]))
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title("TIME_WAIT by dest"),
        );
    f.render_widget(table, area);
}

fn status_line(model: &Model, input: &Input) -> Line<'static> {
    if let Input::Filter(text) = input {
        return Line::from(format!(
            "filter (port or comm; Enter applies, Esc cancels): /{text}_"
        ));
    }
    let s = model.status();
    Line::from(format!(
        "events {}  lost {}  skipped {}  untracked {}  unreadable {}  tracked {}",
        s.events, s.lost, s.skipped, s.untracked, s.unreadable, s.tracked
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kernel::events::TcpState,
        top::model::{CloseWaitRow, Snapshot, TimeWaitRow},
    };
    use ratatui::{backend::TestBackend, Terminal};

    fn screen(model: &Model, input: &Input, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, model, input)).unwrap();
        let buf = t.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..h {
            for x in 0..w {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn model() -> Model {
        let mut m = Model::default();
        let mut s = Snapshot {
            at_ns: 1,
            ..Default::default()
        };
        s.by_state[TcpState::CloseWait.index()] = 3;
        s.by_state[TcpState::Established.index()] = 12;
        s.status.lost = 7;
        s.close_wait.push(CloseWaitRow {
            sock: 1,
            age_ns: 95_000_000_000,
            laddr: "127.0.0.1".parse().unwrap(),
            lport: 8080,
            raddr: "127.0.0.1".parse().unwrap(),
            rport: 41000,
            pid: Some(4242),
            comm: "leaky".into(),
            fd: Some(9),
            more_holders: 0,
            container: "-".into(),
        });
        s.time_wait.push(TimeWaitRow {
            raddr: "10.1.2.3".parse().unwrap(),
            rport: 5432,
            count: 17,
        });
        m.update(s);
        m
    }

    #[test]
    fn draws_states_holders_time_wait_and_status() {
        let text = screen(&model(), &Input::Keys, MIN_WIDTH, MIN_HEIGHT);
        let line = |what: &str| {
            text.lines()
                .find(|l| l.contains(what))
                .unwrap_or_else(|| panic!("no {what} in\n{text}"))
                .to_string()
        };
        assert!(line("CLOSE_WAIT ").contains(" 3 "), "{text}");
        assert!(line("ESTABLISHED").contains(" 12 "), "{text}");
        let holder = line("leaky");
        for want in ["1m35s", "4242", " 9 ", "8080", "127.0.0.1:41000"] {
            assert!(holder.contains(want), "{want} in {holder}");
        }
        assert!(line("10.1.2.3:5432").contains("17"));
        assert!(line("events ").contains("lost 7"));
    }

    #[test]
    fn a_small_screen_gets_one_line() {
        let text = screen(&model(), &Input::Keys, 30, 5);
        assert!(text.starts_with("terminal too small (30x5)"), "{text}");
        // Even one cell: no panic.
        screen(&model(), &Input::Keys, 1, 1);
    }

    #[test]
    fn the_filter_being_typed_shows() {
        let text = screen(&model(), &Input::Filter("80".into()), 100, 30);
        assert!(text.contains("/80_"), "{text}");
    }
}
