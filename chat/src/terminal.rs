//! The interactive terminal: a line editor on its own thread (it blocks on the terminal),
//! whose lines reach coroutines through a pipe, and a sink that prints incoming lines above
//! the input line so what the user is typing stays intact.

use std::io::{self, Write};

use corokit_common::Shutdown;

/// Lines written to it are printed above the line editor's input line. It is the sink of an
/// output thread, like stdout: the printer can block, and must not block a worker.
pub struct AboveInput {
    printer: Box<dyn rustyline::ExternalPrinter + Send>,
    pending: Vec<u8>,
}

impl Write for AboveInput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]).into_owned();
            self.printer.print(text).map_err(io::Error::other)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Starts the line editor: typed lines arrive on the returned channel; Ctrl-C or Ctrl-D at
/// the prompt requests a shutdown.
pub fn editor(shutdown: Shutdown) -> anyhow::Result<(corokit_common::stdin::Lines, AboveInput)> {
    let mut rl = rustyline::DefaultEditor::new()?;
    let printer = rl.create_external_printer()?;
    let (reader, mut writer) = std::io::pipe()?;
    std::thread::Builder::new()
        .name("chat-editor".into())
        .spawn(move || {
            while let Ok(line) = rl.readline("> ") {
                let _ = rl.add_history_entry(line.as_str());
                if writeln!(writer, "{line}").is_err() {
                    break;
                }
            }
            shutdown.request();
        })?;
    Ok((
        corokit_common::stdin::read_lines(reader),
        AboveInput {
            printer: Box::new(printer),
            pending: Vec::new(),
        },
    ))
}
