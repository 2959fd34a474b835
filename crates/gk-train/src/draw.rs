//! Pictures: boxes and captions on images, contact sheets, and line charts, drawn with a
//! built-in bitmap font so nothing depends on system fonts.

use crate::font6x11::{GLYPHS, HEIGHT, WIDTH};
use gk_box::Box4;
use image::{imageops, Rgb, RgbImage};

pub const GREEN: Rgb<u8> = Rgb([40, 200, 80]);
pub const RED: Rgb<u8> = Rgb([230, 40, 40]);
pub const BLUE: Rgb<u8> = Rgb([50, 110, 230]);
pub const ORANGE: Rgb<u8> = Rgb([240, 150, 30]);
pub const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
pub const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
pub const GREY: Rgb<u8> = Rgb([200, 200, 200]);

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Text at `(x, y)` (top-left), each font pixel drawn as a `scale x scale` block.
/// Characters outside printable ASCII are drawn as `?`.
pub fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>, scale: u32) {
    let sc = scale.max(1) as i64;
    for (k, ch) in s.chars().enumerate() {
        let code = if (' '..='~').contains(&ch) {
            ch as usize
        } else {
            '?' as usize
        };
        let glyph = &GLYPHS[code - 32];
        let x0 = x + k as i64 * WIDTH as i64 * sc;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..WIDTH as i64 {
                if bits & (0x80 >> col) != 0 {
                    for dy in 0..sc {
                        for dx in 0..sc {
                            put(img, x0 + col * sc + dx, y + row as i64 * sc + dy, c);
                        }
                    }
                }
            }
        }
    }
}

/// Width in pixels of `s` at `scale`.
pub fn text_width(s: &str, scale: u32) -> u32 {
    s.chars().count() as u32 * WIDTH * scale
}

/// A line (Bresenham), `thickness` pixels wide.
pub fn line(
    img: &mut RgbImage,
    (x0, y0): (i64, i64),
    (x1, y1): (i64, i64),
    c: Rgb<u8>,
    thickness: i64,
) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        for t in 0..thickness {
            for u in 0..thickness {
                put(img, x + t - thickness / 2, y + u - thickness / 2, c);
            }
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// The outline of a pixel xyxy box.
pub fn rect(img: &mut RgbImage, b: Box4, c: Rgb<u8>, thickness: i64) {
    let [x1, y1, x2, y2] = b.map(|v| v.round() as i64);
    line(img, (x1, y1), (x2, y1), c, thickness);
    line(img, (x2, y1), (x2, y2), c, thickness);
    line(img, (x2, y2), (x1, y2), c, thickness);
    line(img, (x1, y2), (x1, y1), c, thickness);
}

/// Splits text into lines of at most `width` characters at spaces.
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for w in s.split_whitespace() {
        let cur = lines.last_mut().expect("one line");
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(w.to_string());
        } else {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(w);
        }
    }
    lines
}

/// The image (upscaled so its long side is at least `min_side`) with the predicted box in
/// red, the ground truth (if any) in green, and a caption panel below.
pub fn annotate(
    img: &RgbImage,
    pred: Box4,
    gt: Option<Box4>,
    caption: &[String],
    min_side: u32,
) -> RgbImage {
    let k = (min_side as f32 / img.width().max(img.height()) as f32).max(1.0);
    let (w, h) = (
        (img.width() as f32 * k) as u32,
        (img.height() as f32 * k) as u32,
    );
    let big = imageops::resize(img, w, h, imageops::FilterType::Nearest);
    let chars = (w / WIDTH).max(8) as usize;
    let lines: Vec<String> = caption.iter().flat_map(|c| wrap(c, chars)).collect();
    let panel = lines.len() as u32 * (HEIGHT + 2) + 4;
    let mut out = RgbImage::from_pixel(w, h + panel, WHITE);
    imageops::replace(&mut out, &big, 0, 0);
    if let Some(g) = gt {
        rect(&mut out, g.map(|v| v * k), GREEN, 2);
    }
    rect(&mut out, pred.map(|v| v * k), RED, 2);
    for (i, l) in lines.iter().enumerate() {
        text(
            &mut out,
            2,
            (h + 3 + i as u32 * (HEIGHT + 2)) as i64,
            l,
            BLACK,
            1,
        );
    }
    out
}

/// Tiles images left to right, top to bottom, with a 4 px white gutter.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let cols = cols.max(1).min(images.len().max(1));
    let cw = images.iter().map(|i| i.width()).max().unwrap_or(1);
    let ch = images.iter().map(|i| i.height()).max().unwrap_or(1);
    let rows = images.len().div_ceil(cols).max(1);
    let mut out = RgbImage::from_pixel(
        cols as u32 * (cw + 4) + 4,
        rows as u32 * (ch + 4) + 4,
        WHITE,
    );
    for (i, im) in images.iter().enumerate() {
        let (c, r) = ((i % cols) as i64, (i / cols) as i64);
        imageops::replace(
            &mut out,
            im,
            4 + c * (cw + 4) as i64,
            4 + r * (ch + 4) as i64,
        );
    }
    out
}

/// One named series of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: Rgb<u8>,
    pub points: Vec<(f64, f64)>,
}

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..=n * 2)
        .map(|i| first + i as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .collect()
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.2}", v / 1000.0)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + "k"
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart with axes, tick labels, a title and a legend.
pub fn line_chart(
    title: &str,
    x_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, WHITE);
    let (left, right, top, bottom) = (48i64, 12i64, 22i64, 30i64);
    let (pw, ph) = (width as i64 - left - right, height as i64 - top - bottom);
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let px = |x: f64| left + ((x - x0) / (x1 - x0) * pw as f64).round() as i64;
    let py = |y: f64| top + ph - ((y - y0) / (y1 - y0) * ph as f64).round() as i64;
    for t in nice_ticks(y0, y1, 5) {
        line(&mut img, (left, py(t)), (left + pw, py(t)), GREY, 1);
        let s = fmt_tick(t);
        text(
            &mut img,
            left - 4 - text_width(&s, 1) as i64,
            py(t) - 5,
            &s,
            BLACK,
            1,
        );
    }
    for t in nice_ticks(x0, x1, 6) {
        let s = fmt_tick(t);
        line(&mut img, (px(t), top + ph), (px(t), top + ph + 3), BLACK, 1);
        text(
            &mut img,
            px(t) - text_width(&s, 1) as i64 / 2,
            top + ph + 5,
            &s,
            BLACK,
            1,
        );
    }
    line(&mut img, (left, top), (left, top + ph), BLACK, 1);
    line(&mut img, (left, top + ph), (left + pw, top + ph), BLACK, 1);
    for s in series {
        for w in s.points.windows(2) {
            line(
                &mut img,
                (px(w[0].0), py(w[0].1)),
                (px(w[1].0), py(w[1].1)),
                s.color,
                2,
            );
        }
        if s.points.len() == 1 {
            let (x, y) = s.points[0];
            line(&mut img, (px(x) - 2, py(y)), (px(x) + 2, py(y)), s.color, 3);
        }
    }
    text(&mut img, left, 5, title, BLACK, 1);
    text(
        &mut img,
        left + pw - text_width(x_label, 1) as i64,
        height as i64 - 13,
        x_label,
        BLACK,
        1,
    );
    let mut lx = left + text_width(title, 1) as i64 + 16;
    for s in series {
        line(&mut img, (lx, 10), (lx + 12, 10), s.color, 3);
        text(&mut img, lx + 16, 5, &s.name, BLACK, 1);
        lx += 24 + text_width(&s.name, 1) as i64;
    }
    img
}

/// One bar series of [`bar_chart`]: `(mean, spread)` per group.
#[derive(Debug, Clone)]
pub struct Bars {
    pub name: String,
    pub color: Rgb<u8>,
    pub values: Vec<(f64, f64)>,
}

/// Top-left corners of legend entries (a 12-px swatch, then the name) flowed left to right
/// from `left` under the title, wrapping before `right_edge`; rows are 12 px apart from y 20.
fn legend_layout(names: &[&str], left: i64, right_edge: i64) -> Vec<(i64, i64)> {
    let (mut x, mut row) = (left, 0i64);
    names
        .iter()
        .map(|name| {
            let w = 26 + text_width(name, 1) as i64;
            if x > left && x + w > right_edge {
                (x, row) = (left, row + 1);
            }
            x += w;
            (x - w, 20 + 12 * row)
        })
        .collect()
}

/// Grouped bars from 0 with a whisker of +-spread, group labels under the axis, a title
/// and a legend.
pub fn bar_chart(
    title: &str,
    groups: &[String],
    series: &[Bars],
    width: u32,
    height: u32,
) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, WHITE);
    let (left, right, bottom) = (48i64, 12i64, 30i64);
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    let legend = legend_layout(&names, left, width as i64 - right);
    let rows = legend.last().map_or(1, |&(_, y)| (y - 20) / 12 + 1);
    let top = 22 + 12 * rows;
    let (pw, ph) = (width as i64 - left - right, height as i64 - top - bottom);
    let y1 = series
        .iter()
        .flat_map(|s| s.values.iter().map(|(m, e)| m + e))
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let py = |y: f64| top + ph - ((y.max(0.0) / y1) * ph as f64).round() as i64;
    for t in nice_ticks(0.0, y1, 5) {
        line(&mut img, (left, py(t)), (left + pw, py(t)), GREY, 1);
        let s = fmt_tick(t);
        text(
            &mut img,
            left - 4 - text_width(&s, 1) as i64,
            py(t) - 5,
            &s,
            BLACK,
            1,
        );
    }
    let gw = pw / groups.len().max(1) as i64;
    let bw = ((gw - 8) / series.len().max(1) as i64).max(1);
    for (g, name) in groups.iter().enumerate() {
        let gx = left + g as i64 * gw + 4;
        for (k, s) in series.iter().enumerate() {
            let Some(&(m, e)) = s.values.get(g) else {
                continue;
            };
            if !m.is_finite() {
                continue;
            }
            let x = gx + k as i64 * bw;
            for xx in x..x + bw - 1 {
                line(&mut img, (xx, py(m)), (xx, top + ph), s.color, 1);
            }
            let xc = x + bw / 2;
            line(&mut img, (xc, py(m - e)), (xc, py(m + e)), BLACK, 1);
            line(&mut img, (xc - 2, py(m + e)), (xc + 2, py(m + e)), BLACK, 1);
            line(&mut img, (xc - 2, py(m - e)), (xc + 2, py(m - e)), BLACK, 1);
        }
        text(
            &mut img,
            gx + (gw - 8 - text_width(name, 1) as i64) / 2,
            top + ph + 6,
            name,
            BLACK,
            1,
        );
    }
    line(&mut img, (left, top), (left, top + ph), BLACK, 1);
    line(&mut img, (left, top + ph), (left + pw, top + ph), BLACK, 1);
    text(&mut img, left, 5, title, BLACK, 1);
    for (s, &(lx, ly)) in series.iter().zip(&legend) {
        line(&mut img, (lx, ly + 5), (lx + 12, ly + 5), s.color, 4);
        text(&mut img, lx + 16, ly, &s.name, BLACK, 1);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_boxes_touch_the_right_pixels() {
        let mut img = RgbImage::from_pixel(40, 20, WHITE);
        text(&mut img, 0, 0, "A", BLACK, 1);
        assert!(img.pixels().any(|p| *p == BLACK));
        rect(&mut img, [10.0, 2.0, 30.0, 15.0], RED, 1);
        assert_eq!(*img.get_pixel(20, 2), RED);
        assert_eq!(*img.get_pixel(30, 10), RED);
        assert_eq!(*img.get_pixel(20, 10), WHITE);
    }

    #[test]
    fn legend_entries_never_overlap_and_wrap_inside_the_chart() {
        let names = [
            "baseline",
            "qrnet",
            "qrnet-no-channel",
            "qrnet-no-spatial",
            "qrnet-no-neck",
        ];
        let at = legend_layout(&names, 48, 428);
        for (k, (&(x, y), name)) in at.iter().zip(names).enumerate() {
            assert!(
                x + 16 + text_width(name, 1) as i64 <= 428,
                "{name} runs past the edge"
            );
            if let Some(&(nx, ny)) = at.get(k + 1) {
                assert!(
                    ny > y || nx >= x + 16 + text_width(name, 1) as i64,
                    "{name} overlaps"
                );
            }
        }
        assert!(
            at.last().unwrap().1 > 20,
            "five long names need a second row at 440 px"
        );
    }

    #[test]
    fn chart_and_annotation_have_expected_sizes() {
        let s = Series {
            name: "loss".into(),
            color: BLUE,
            points: vec![(0.0, 1.0), (10.0, 0.5), (20.0, 0.2)],
        };
        let c = line_chart("training", "step", &[s], 320, 200);
        assert_eq!(c.dimensions(), (320, 200));
        assert!(c.pixels().any(|p| *p == BLUE));
        let img = RgbImage::from_pixel(64, 32, BLACK);
        let a = annotate(
            &img,
            [1.0, 1.0, 20.0, 20.0],
            Some([2.0, 2.0, 30.0, 30.0]),
            &["the red circle".into()],
            256,
        );
        assert_eq!(a.width(), 256);
        assert!(a.height() > 128);
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
    }
}
