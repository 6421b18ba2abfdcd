//! Procedural clean scenes, seeded: a sky-to-ground backdrop and a stack of shapes (rectangles,
//! discs, rotated ellipses, striped and checkered panels) in varied colours with shading, hard
//! edges and a faint smooth texture. They give the planner's accuracy test clean images with
//! what photographs have and synthetic degradations act on: flat regions, edges in every
//! direction, saturated colours and shadows (a dark channel near 0), and fine texture.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::image::Image;
use crate::testing::rng;

/// `(h, s, v)` in `[0,1]` to RGB.
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h6 = (h.rem_euclid(1.0)) * 6.0;
    let sector = h6.floor() as i32;
    let f = h6 - sector as f32;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match sector {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// How a shape covers the plane.
enum Outline {
    Rect { x0: f32, y0: f32, x1: f32, y1: f32 },
    Ellipse { cx: f32, cy: f32, rx: f32, ry: f32, cos: f32, sin: f32 },
}

impl Outline {
    fn contains(&self, x: f32, y: f32) -> bool {
        match *self {
            Self::Rect { x0, y0, x1, y1 } => x >= x0 && x < x1 && y >= y0 && y < y1,
            Self::Ellipse { cx, cy, rx, ry, cos, sin } => {
                let (dx, dy) = (x - cx, y - cy);
                let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
                (u / rx).powi(2) + (v / ry).powi(2) <= 1.0
            }
        }
    }
}

/// How a shape is filled.
enum Fill {
    /// A colour shaded linearly along `(gx, gy)` (value change per pixel).
    Shaded { colour: [f32; 3], gx: f32, gy: f32, cx: f32, cy: f32 },
    /// Stripes of two colours, period `period` px, across direction `(cos, sin)`.
    Stripes { a: [f32; 3], b: [f32; 3], period: f32, cos: f32, sin: f32 },
    /// A checkerboard of two colours with cells of `cell` px.
    Checker { a: [f32; 3], b: [f32; 3], cell: f32 },
}

impl Fill {
    fn colour(&self, x: f32, y: f32) -> [f32; 3] {
        match *self {
            Self::Shaded { colour, gx, gy, cx, cy } => {
                let shade = 1.0 + gx * (x - cx) + gy * (y - cy);
                colour.map(|c| (c * shade).clamp(0.0, 1.0))
            }
            Self::Stripes { a, b, period, cos, sin } => {
                if ((x * cos + y * sin) / period).rem_euclid(1.0) < 0.5 {
                    a
                } else {
                    b
                }
            }
            Self::Checker { a, b, cell } => {
                if ((x / cell).floor() + (y / cell).floor()).rem_euclid(2.0) < 1.0 {
                    a
                } else {
                    b
                }
            }
        }
    }
}

fn random_colour(rng: &mut ChaCha8Rng) -> [f32; 3] {
    hsv_to_rgb(rng.random(), rng.random_range(0.3..0.95), rng.random_range(0.1..0.95))
}

/// A smooth random field in about `[-1, 1]`: a coarse grid of uniform values, bilinearly
/// interpolated; `cells` cells across the longer side.
pub fn smooth_field(rng: &mut ChaCha8Rng, width: usize, height: usize, cells: usize) -> Vec<f32> {
    let step = width.max(height) as f32 / cells.max(1) as f32;
    let (gw, gh) = ((width as f32 / step).ceil() as usize + 2, (height as f32 / step).ceil() as usize + 2);
    let grid: Vec<f32> = (0..gw * gh).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f32 / step, y as f32 / step);
            let (ix, iy) = (fx as usize, fy as usize);
            let (tx, ty) = (fx - ix as f32, fy - iy as f32);
            let g = |i: usize, j: usize| grid[j * gw + i];
            let top = g(ix, iy) * (1.0 - tx) + g(ix + 1, iy) * tx;
            let bottom = g(ix, iy + 1) * (1.0 - tx) + g(ix + 1, iy + 1) * tx;
            out.push(top * (1.0 - ty) + bottom * ty);
        }
    }
    out
}

/// A clean `width x height` scene from `seed` (the same seed gives the same image).
pub fn scene(seed: u64, width: usize, height: usize) -> Image {
    let mut rng = rng(seed);
    let (w, h) = (width as f32, height as f32);
    let sky_top = hsv_to_rgb(rng.random_range(0.5..0.7), rng.random_range(0.2..0.7), rng.random_range(0.6..0.95));
    let sky_bottom = hsv_to_rgb(rng.random_range(0.45..0.65), rng.random_range(0.05..0.4), rng.random_range(0.7..1.0));
    let ground = random_colour(&mut rng);
    let horizon = h * rng.random_range(0.3..0.6);
    let min_side = w.min(h);
    let count = rng.random_range(10..25);
    let mut shapes = Vec::with_capacity(count);
    for _ in 0..count {
        let (cx, cy) = (rng.random_range(0.0..w), rng.random_range(0.0..h));
        let (sx, sy) = (min_side * rng.random_range(0.05..0.3), min_side * rng.random_range(0.05..0.3));
        let angle: f32 = rng.random_range(0.0..std::f32::consts::PI);
        let outline = if rng.random_bool(0.5) {
            Outline::Rect { x0: cx - sx, y0: cy - sy, x1: cx + sx, y1: cy + sy }
        } else {
            Outline::Ellipse { cx, cy, rx: sx, ry: sy, cos: angle.cos(), sin: angle.sin() }
        };
        let fill = match rng.random_range(0..10) {
            0 => Fill::Stripes {
                a: random_colour(&mut rng),
                b: random_colour(&mut rng),
                period: rng.random_range(6.0..24.0),
                cos: angle.cos(),
                sin: angle.sin(),
            },
            1 => Fill::Checker {
                a: random_colour(&mut rng),
                b: random_colour(&mut rng),
                cell: rng.random_range(4.0..16.0),
            },
            _ => Fill::Shaded {
                colour: random_colour(&mut rng),
                gx: rng.random_range(-1.0..1.0) / min_side,
                gy: rng.random_range(-1.0..1.0) / min_side,
                cx,
                cy,
            },
        };
        shapes.push((outline, fill));
    }
    let texture = smooth_field(&mut rng, width, height, 48);
    Image::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        let mut colour = if fy < horizon {
            let t = fy / horizon;
            [0, 1, 2].map(|c| sky_top[c] * (1.0 - t) + sky_bottom[c] * t)
        } else {
            let t = (fy - horizon) / (h - horizon).max(1.0);
            ground.map(|c| c * (0.7 + 0.5 * t))
        };
        for (outline, fill) in &shapes {
            if outline.contains(fx, fy) {
                colour = fill.colour(fx, fy);
            }
        }
        let grain = 0.03 * texture[y * width + x];
        colour.map(|c| (c + grain).clamp(0.0, 1.0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_seeded_varied_and_in_range() {
        let a = scene(1, 96, 64);
        assert_eq!(a, scene(1, 96, 64));
        assert_ne!(a, scene(2, 96, 64));
        assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)));
        let distinct: std::collections::BTreeSet<u32> = a.data.iter().map(|v| (v * 50.0) as u32).collect();
        assert!(distinct.len() > 10, "a scene should hold many levels, got {}", distinct.len());
        assert_eq!(hsv_to_rgb(0.0, 1.0, 1.0), [1.0, 0.0, 0.0]);
        assert_eq!(hsv_to_rgb(0.5, 0.0, 0.25), [0.25, 0.25, 0.25]);
    }
}
