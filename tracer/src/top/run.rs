//! The view's thread: owns the terminal (raw mode, alternate screen),
//! draws the model when a snapshot comes, a key is pressed or the
//! terminal is resized, and gives the terminal back on every way out.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, TryRecvError},
    },
    time::Duration,
};

use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    execute,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{backend::CrosstermBackend, Terminal};

use super::{
    model::{Filter, Model, Snapshot},
    view::{self, Input},
};

/// Is the terminal ours (raw mode, alternate screen)?
static TAKEN: AtomicBool = AtomicBool::new(false);

/// How long the thread waits for a key before it looks for a snapshot.
const KEY_WAIT: Duration = Duration::from_millis(100);

/// Gives the terminal back as it was, once; safe to call from anywhere
/// (a panic hook, the main thread).
pub fn restore() {
    if TAKEN.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
}

/// Restores on drop: the thread's every way out, errors included.
struct Taken;

impl Drop for Taken {
    fn drop(&mut self) {
        restore();
    }
}

/// What a key does.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Redraw,
    Quit,
}

/// Applies key `k` to the model and the input line.
pub fn key(model: &mut Model, input: &mut Input, k: KeyEvent) -> Action {
    // In raw mode Ctrl-C is a key, not SIGINT.
    if k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL) {
        return Action::Quit;
    }
    match input {
        Input::Filter(text) => match k.code {
            KeyCode::Enter => {
                model.filter = Filter::parse(text);
                *input = Input::Keys;
            }
            KeyCode::Esc => *input = Input::Keys,
            KeyCode::Backspace => {
                text.pop();
            }
            KeyCode::Char(c) if text.len() < 32 => text.push(c),
            _ => return Action::Nothing,
        },
        Input::Keys => match k.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Char('s') => model.sort = model.sort.next(),
            KeyCode::Char('p') => model.paused = !model.paused,
            // A new filter each time; Enter on nothing clears it.
            KeyCode::Char('/') => *input = Input::Filter(String::new()),
            _ => return Action::Nothing,
        },
    }
    Action::Redraw
}

/// Runs until `q` (then tells the agent through `quit`) or until the
/// agent stops (its sender is dropped).
pub fn view(
    snapshots: Receiver<Snapshot>,
    quit: tokio::sync::oneshot::Sender<()>,
) -> io::Result<()> {
    terminal::enable_raw_mode()?;
    TAKEN.store(true, Ordering::SeqCst);
    let _taken = Taken;
    execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    terminal.clear()?;
    let mut model = Model::default();
    let mut input = Input::Keys;
    let mut dirty = true;
    loop {
        if dirty {
            // Draw also fits the frame to the terminal's size now.
            terminal.draw(|f| view::draw(f, &model, &input))?;
            dirty = false;
        }
        if event::poll(KEY_WAIT)? {
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    match key(&mut model, &mut input, k) {
                        Action::Quit => {
                            let _ = quit.send(());
                            return Ok(());
                        }
                        Action::Redraw => dirty = true,
                        Action::Nothing => {}
                    }
                }
                Event::Resize(..) => {
                    terminal.autoresize()?;
                    dirty = true;
                }
                _ => {}
            }
        }
        loop {
            match snapshots.try_recv() {
                Ok(s) => {
                    model.update(s);
                    dirty = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::model::Sort;

    fn press(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    #[test]
    fn keys_sort_pause_filter_and_quit() {
        let mut m = Model::default();
        let mut i = Input::Keys;
        assert_eq!(
            key(&mut m, &mut i, press(KeyCode::Char('s'))),
            Action::Redraw
        );
        assert_eq!(m.sort, Sort::Pid);
        key(&mut m, &mut i, press(KeyCode::Char('p')));
        assert!(m.paused);
        key(&mut m, &mut i, press(KeyCode::Char('/')));
        for c in "8080".chars() {
            key(&mut m, &mut i, press(KeyCode::Char(c)));
        }
        // Keys typed into the filter do not act.
        key(&mut m, &mut i, press(KeyCode::Char('q')));
        key(&mut m, &mut i, press(KeyCode::Backspace));
        assert_eq!(i, Input::Filter("8080".into()));
        key(&mut m, &mut i, press(KeyCode::Enter));
        assert_eq!(
            (m.filter.clone(), &i),
            (Some(Filter::Port(8080)), &Input::Keys)
        );
        // An empty filter clears it.
        key(&mut m, &mut i, press(KeyCode::Char('/')));
        assert_eq!(i, Input::Filter(String::new()));
        key(&mut m, &mut i, press(KeyCode::Enter));
        assert_eq!(m.filter, None);
        assert_eq!(key(&mut m, &mut i, press(KeyCode::Char('q'))), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(key(&mut m, &mut i, ctrl_c), Action::Quit);
    }
}
