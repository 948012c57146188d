//! The loss curves as a PNG: a panel per user, a curve per learner and task
//! (colour: task; solid: with the anchor pull; dashed: plain), vertical
//! lines where tasks change (dark) and users join or leave (light). Drawn
//! into an RGB buffer with a built-in 3 x 5 pixel font, encoded by the `png`
//! crate.
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use crate::tasks::Stream;

/// What is drawn of one learner.
pub struct Learner<'a> {
    pub user: usize,
    pub anchor: bool,
    /// Per task: (step, loss).
    pub curves: &'a [Vec<(usize, f32)>],
}

const PANEL_W: usize = 520;
const PANEL_H: usize = 300;
const TOP: usize = 70;
const MARGIN: usize = 50;
const TASK_COLOURS: [[u8; 3]; 3] = [[31, 119, 180], [230, 110, 0], [44, 160, 44]];
const GREY: [u8; 3] = [120, 120, 120];
const LIGHT: [u8; 3] = [200, 200, 200];
const BLACK: [u8; 3] = [0, 0, 0];

/// Writes the plot to `path`; losses were measured every `eval_every` of
/// `steps` steps (and at events). `events`: (step, user, whether it is a task
/// change rather than a join or leave).
pub fn losses(
    path: &Path,
    users: &[Stream],
    learners: &[Learner],
    (steps, eval_every): (usize, usize),
    events: &[(usize, usize, bool)],
) -> Result<(), Box<dyn std::error::Error>> {
    let cols = 2;
    let rows = users.len().div_ceil(cols);
    let mut c = Canvas::new(cols * PANEL_W, TOP + rows * PANEL_H);
    c.text(
        MARGIN,
        12,
        "HELD-OUT LOSS PER USER AND TASK OVER STEPS",
        3,
        BLACK,
    );
    legend(&mut c);
    let top_loss = learners
        .iter()
        .flat_map(|l| l.curves.iter().flatten().map(|p| p.1))
        .fold(1.0f32, f32::max)
        .ceil();
    for (u, user) in users.iter().enumerate() {
        let frame = Frame {
            x0: (u % cols) * PANEL_W + MARGIN,
            y0: TOP + (u / cols) * PANEL_H + 30,
            w: PANEL_W - MARGIN - 20,
            h: PANEL_H - 70,
            steps,
            top_loss,
        };
        let title = format!("{} (RANK {})", user.name.to_uppercase(), user.rank);
        c.text(frame.x0, frame.y0 - 18, &title, 2, BLACK);
        for &(step, _, task_change) in events.iter().filter(|e| e.1 == u) {
            let x = frame.x(step as f32);
            let colour = if task_change { GREY } else { LIGHT };
            c.line(
                (x, frame.y0),
                (x, frame.y0 + frame.h),
                colour,
                if task_change { 0 } else { 4 },
            );
        }
        frame.axes(&mut c);
        for l in learners.iter().filter(|l| l.user == u) {
            for (task, curve) in l.curves.iter().enumerate() {
                let colour = TASK_COLOURS[task % TASK_COLOURS.len()];
                let dash = if l.anchor { 0 } else { 6 };
                // No line across a gap: the learner was away.
                for pair in curve.windows(2).filter(|p| p[1].0 - p[0].0 <= eval_every) {
                    let (a, b) = (frame.point(pair[0]), frame.point(pair[1]));
                    c.thick_line(a, b, colour, dash);
                }
            }
        }
    }
    c.save(path)
}

fn legend(c: &mut Canvas) {
    let y = 45;
    let mut x = MARGIN;
    for (task, colour) in TASK_COLOURS.iter().take(2).enumerate() {
        c.thick_line((x, y + 4), (x + 30, y + 4), *colour, 0);
        c.text(x + 36, y, &format!("TASK {}", task + 1), 2, BLACK);
        x += 120;
    }
    c.thick_line((x, y + 4), (x + 30, y + 4), GREY, 0);
    c.text(x + 36, y, "WITH ANCHOR PULL", 2, BLACK);
    x += 170;
    c.thick_line((x, y + 4), (x + 30, y + 4), GREY, 6);
    c.text(x + 36, y, "PLAIN", 2, BLACK);
    x += 90;
    c.text(x, y, "DARK LINE: NEW TASK; LIGHT: JOIN/LEAVE", 2, GREY);
}

/// A panel's plotting area: steps across, loss up.
struct Frame {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
    steps: usize,
    top_loss: f32,
}

impl Frame {
    fn x(&self, step: f32) -> usize {
        self.x0 + (step / self.steps as f32 * self.w as f32).round() as usize
    }

    fn point(&self, (step, loss): (usize, f32)) -> (usize, usize) {
        let up = (loss.clamp(0.0, self.top_loss) / self.top_loss * self.h as f32).round() as usize;
        (self.x(step as f32), self.y0 + self.h - up)
    }

    fn axes(&self, c: &mut Canvas) {
        let (x1, y1) = (self.x0 + self.w, self.y0 + self.h);
        c.line((self.x0, y1), (x1, y1), BLACK, 0);
        c.line((self.x0, self.y0), (self.x0, y1), BLACK, 0);
        let ticks = 4;
        for i in 0..=ticks {
            let step = self.steps * i / ticks;
            let x = self.x(step as f32);
            c.line((x, y1), (x, y1 + 4), BLACK, 0);
            c.text(x.saturating_sub(6), y1 + 8, &step.to_string(), 2, BLACK);
            let loss = self.top_loss * i as f32 / ticks as f32;
            let (_, y) = self.point((0, loss));
            c.line((self.x0 - 4, y), (self.x0, y), BLACK, 0);
            c.text(
                self.x0 - 40,
                y.saturating_sub(5),
                &format!("{loss:.1}"),
                2,
                BLACK,
            );
        }
        c.text(x1 - 60, y1 + 22, "STEP", 2, GREY);
    }
}

struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            rgb: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: usize, y: usize, colour: [u8; 3]) {
        if x < self.w && y < self.h {
            let at = (y * self.w + x) * 3;
            self.rgb[at..at + 3].copy_from_slice(&colour);
        }
    }

    /// A one-pixel line; `dash` > 0 draws `dash` pixels on, `dash` off.
    fn line(
        &mut self,
        (x0, y0): (usize, usize),
        (x1, y1): (usize, usize),
        colour: [u8; 3],
        dash: usize,
    ) {
        let (dx, dy) = (x1 as f32 - x0 as f32, y1 as f32 - y0 as f32);
        let n = dx.abs().max(dy.abs()).ceil().max(1.0) as usize;
        for i in 0..=n {
            if dash > 0 && (i / dash) % 2 == 1 {
                continue;
            }
            let t = i as f32 / n as f32;
            let (x, y) = (x0 as f32 + t * dx, y0 as f32 + t * dy);
            self.set(x.round() as usize, y.round() as usize, colour);
        }
    }

    fn thick_line(&mut self, a: (usize, usize), b: (usize, usize), colour: [u8; 3], dash: usize) {
        for off in 0..2 {
            self.line((a.0, a.1 + off), (b.0, b.1 + off), colour, dash);
        }
    }

    /// Upper-case text, digits and a little punctuation at `scale` pixels
    /// per font pixel.
    fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, colour: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) == 0 {
                        continue;
                    }
                    for (px, py) in (0..scale).flat_map(|a| (0..scale).map(move |b| (a, b))) {
                        let gx = x + i * 4 * scale + col * scale + px;
                        self.set(gx, y + r * scale + py, colour);
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let file = BufWriter::new(File::create(path)?);
        let mut encoder = png::Encoder::new(file, self.w as u32, self.h as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(&self.rgb)?;
        Ok(())
    }
}

/// A 3 x 5 glyph: five rows of three bits (4 = left column).
fn glyph(ch: char) -> [u8; 5] {
    let rows: &str = match ch {
        'A' => "010 101 111 101 101",
        'B' => "110 101 110 101 110",
        'C' => "011 100 100 100 011",
        'D' => "110 101 101 101 110",
        'E' => "111 100 110 100 111",
        'F' => "111 100 110 100 100",
        'G' => "011 100 101 101 011",
        'H' => "101 101 111 101 101",
        'I' => "111 010 010 010 111",
        'J' => "001 001 001 101 010",
        'K' => "101 101 110 101 101",
        'L' => "100 100 100 100 111",
        'M' => "101 111 111 101 101",
        'N' => "110 101 101 101 101",
        'O' => "010 101 101 101 010",
        'P' => "110 101 110 100 100",
        'Q' => "010 101 101 110 011",
        'R' => "110 101 110 101 101",
        'S' => "011 100 010 001 110",
        'T' => "111 010 010 010 010",
        'U' => "101 101 101 101 111",
        'V' => "101 101 101 101 010",
        'W' => "101 101 111 111 101",
        'X' => "101 101 010 101 101",
        'Y' => "101 101 010 010 010",
        'Z' => "111 001 010 100 111",
        '0' => "111 101 101 101 111",
        '1' => "010 110 010 010 111",
        '2' => "110 001 010 100 111",
        '3' => "110 001 010 001 110",
        '4' => "101 101 111 001 001",
        '5' => "111 100 110 001 110",
        '6' => "011 100 111 101 111",
        '7' => "111 001 010 010 010",
        '8' => "111 101 111 101 111",
        '9' => "111 101 111 001 110",
        '.' => "000 000 000 000 010",
        ',' => "000 000 000 010 100",
        ':' => "000 010 000 010 000",
        ';' => "000 010 000 010 100",
        '(' => "001 010 010 010 001",
        ')' => "100 010 010 010 100",
        '-' => "000 000 111 000 000",
        '+' => "000 010 111 010 000",
        '/' => "001 001 010 100 100",
        '=' => "000 111 000 111 000",
        _ => "000 000 000 000 000",
    };
    let mut out = [0u8; 5];
    for (o, row) in out.iter_mut().zip(rows.split(' ')) {
        *o = u8::from_str_radix(row, 2).expect("a glyph row is three bits");
    }
    out
}
