//! RGB images as the pipeline holds them: planar `[3,H,W]` f32 in `[0,1]`, read from and
//! written to PNG, JPEG and TIFF files.
//!
//! Loading converts every stored layout to RGB f32: 8-bit samples are divided by 255, 16-bit
//! samples by 65535 (full precision: f32 holds every 16-bit value exactly), f32 TIFF samples are
//! clamped to `[0,1]`; grey images are copied into all three channels; an alpha channel is
//! composited over white (`c * a + (1 - a)`), so a transparent pixel reads as white, as a viewer
//! shows it on a white page. Saving writes 8-bit RGB (values clamped to `[0,1]` and rounded).

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Once;

use crate::error::{FapeError, Result};
use crate::tensor::View;

/// The op name in the errors of [`Image::view`].
const OP: &str = "image";

/// An RGB image: `data` is planar `[3,H,W]` (all of R, then G, then B; rows top to bottom),
/// values in `[0,1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// `W`, pixels per row.
    pub width: usize,
    /// `H`, rows.
    pub height: usize,
    /// `[3,H,W]` planar RGB in `[0,1]`.
    pub data: Vec<f32>,
}

fn file_error(path: &Path, message: impl Into<String>) -> FapeError {
    FapeError::File { path: path.display().to_string(), message: message.into() }
}

impl Image {
    /// An image from planar `[3,H,W]` data.
    ///
    /// # Errors
    /// [`FapeError::Shape`] when `width` or `height` is 0; [`FapeError::Layout`] when
    /// `data.len() != 3 * height * width`.
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Result<Self> {
        let image = Self { width, height, data };
        image.validate()?;
        Ok(image)
    }

    /// A `width x height` image whose pixel `(x, y)` is `rgb(x, y)` (`x` along a row, `y` down
    /// the rows). Panics only if `width * height * 3` overflows `usize`.
    pub fn from_fn(width: usize, height: usize, mut rgb: impl FnMut(usize, usize) -> [f32; 3]) -> Self {
        let plane = width * height;
        let mut data = vec![0.0f32; 3 * plane];
        for y in 0..height {
            for x in 0..width {
                let px = rgb(x, y);
                for (c, v) in px.into_iter().enumerate() {
                    data[c * plane + y * width + x] = v;
                }
            }
        }
        Self { width, height, data }
    }

    /// Checks the invariants a hand-built `Image` must keep: both extents at least 1 and
    /// `data.len() == 3 * height * width`.
    ///
    /// # Errors
    /// [`FapeError::Shape`] for a zero extent, [`FapeError::Layout`] for a wrong length.
    pub fn validate(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 {
            return Err(FapeError::Shape {
                op: OP,
                tensor: "image",
                expected: "[3,H,W] with H, W >= 1".to_string(),
                actual: vec![3, self.height, self.width],
            });
        }
        let needed = 3 * self.height * self.width;
        if self.data.len() != needed {
            return Err(FapeError::Layout {
                op: OP,
                tensor: "image",
                len: self.data.len(),
                shape: vec![3, self.height, self.width],
                needed,
            });
        }
        Ok(())
    }

    /// The same extents with every value mapped through `f`.
    pub fn map(&self, f: impl Fn(f32) -> f32) -> Image {
        Image { width: self.width, height: self.height, data: self.data.iter().map(|&v| f(v)).collect() }
    }

    /// Pixels per channel, `H * W`.
    pub fn pixels(&self) -> usize {
        self.width * self.height
    }

    /// Channel `c` (0 R, 1 G, 2 B) as a row-major `[H,W]` slice.
    ///
    /// # Panics
    /// When `c > 2` or the image does not hold `3 * H * W` values (see [`Image::validate`]).
    pub fn channel(&self, c: usize) -> &[f32] {
        let plane = self.pixels();
        &self.data[c * plane..(c + 1) * plane]
    }

    /// The shape `[1,3,H,W]` of the image as the ops take it (a batch of one).
    pub fn shape(&self) -> [usize; 4] {
        [1, 3, self.height, self.width]
    }

    /// The image as a `[1,3,H,W]` view for the ops. `shape` must be [`Image::shape`]; it is
    /// passed in because a view borrows its shape:
    /// `let shape = image.shape(); let x = image.view(&shape)?;`.
    ///
    /// # Errors
    /// [`FapeError::Shape`] when `shape` is not this image's shape; [`FapeError::Layout`] when
    /// the data does not hold `3 * H * W` values.
    pub fn view<'a>(&'a self, shape: &'a [usize; 4]) -> Result<View<'a, f32>> {
        if *shape != self.shape() {
            return Err(FapeError::Shape {
                op: OP,
                tensor: "image",
                expected: format!("{:?}", self.shape()),
                actual: shape.to_vec(),
            });
        }
        View::new(OP, "image", &self.data, shape)
    }

    /// Luma `0.299 R + 0.587 G + 0.114 B` (ITU-R BT.601), row-major `[H,W]`.
    pub fn to_grey(&self) -> Vec<f32> {
        let (r, g, b) = (self.channel(0), self.channel(1), self.channel(2));
        let [wr, wg, wb] = crate::freq::BT601_LUMA;
        r.iter().zip(g).zip(b).map(|((&r, &g), &b)| wr * r + wg * g + wb * b).collect()
    }

    /// Reads a PNG, JPEG or TIFF file (the format is read from the content, not the extension)
    /// into RGB `[0,1]`, converting as the module documentation says, refusing images of more
    /// than [`DEFAULT_MAX_PIXELS`] (see [`Image::load_limited`]).
    ///
    /// # Errors
    /// As [`Image::load_limited`].
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_limited(path, DEFAULT_MAX_PIXELS)
    }

    /// [`Image::load`] with a limit of `max_pixels` (width x height): the header's size is
    /// checked against it before the pixels are decoded, and the decoder may allocate at most
    /// [`decode_budget`]`(max_pixels)` bytes, so a small file that claims a huge image costs
    /// nothing but the error.
    ///
    /// # Errors
    /// [`FapeError::File`] naming `path` when the file cannot be opened, is not an image in a
    /// supported format, is truncated or corrupt, claims more than `max_pixels` pixels (the
    /// message gives the claimed size and the limit) or needs more memory to decode than the
    /// limit allows, has zero width or height, or holds a non-finite sample.
    pub fn load_limited(path: &Path, max_pixels: u64) -> Result<Self> {
        let reader = image::ImageReader::open(path).map_err(|e| file_error(path, format!("cannot open: {e}")))?;
        decode(path, reader, max_pixels)
    }

    /// [`Image::load_limited`] of a file's contents held in memory; `name` is what errors name.
    ///
    /// # Errors
    /// As [`Image::load_limited`].
    pub fn from_bytes(name: &str, bytes: &[u8], max_pixels: u64) -> Result<Self> {
        decode(Path::new(name), image::ImageReader::new(std::io::Cursor::new(bytes)), max_pixels)
    }

    /// Writes the image as 8-bit RGB; the format follows the extension (`.png`, `.jpg`/`.jpeg`,
    /// `.tif`/`.tiff`). Values are clamped to `[0,1]` and rounded; NaN is written as 0.
    ///
    /// # Errors
    /// [`FapeError::Shape`]/[`FapeError::Layout`] as [`Image::validate`]; [`FapeError::File`]
    /// naming `path` for an unknown extension, an extent past `u32`, or a failed write.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let format = image::ImageFormat::from_path(path)
            .map_err(|_| file_error(path, "unknown image extension (use .png, .jpg or .tif)"))?;
        let buffer = self.to_rgb8().map_err(|message| file_error(path, message))?;
        buffer.save_with_format(path, format).map_err(|e| file_error(path, format!("cannot write image: {e}")))
    }

    /// The image as an in-memory 8-bit RGB PNG (as [`Image::save`] writes it).
    ///
    /// # Errors
    /// [`FapeError::Shape`]/[`FapeError::Layout`] as [`Image::validate`]; [`FapeError::File`]
    /// (path `<memory>`) when an extent is past `u32` or the encoder fails.
    pub fn encode_png(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let memory = Path::new("<memory>");
        let buffer = self.to_rgb8().map_err(|message| file_error(memory, message))?;
        let mut bytes = std::io::Cursor::new(Vec::new());
        buffer
            .write_to(&mut bytes, image::ImageFormat::Png)
            .map_err(|e| file_error(memory, format!("cannot encode PNG: {e}")))?;
        Ok(bytes.into_inner())
    }

    /// Interleaved 8-bit RGB of a validated image; the error says why it cannot be.
    fn to_rgb8(&self) -> std::result::Result<image::RgbImage, String> {
        let (w, h) = match (u32::try_from(self.width), u32::try_from(self.height)) {
            (Ok(w), Ok(h)) => (w, h),
            _ => return Err(format!("image of {}x{} is too large", self.width, self.height)),
        };
        let plane = self.pixels();
        let mut bytes = Vec::with_capacity(3 * plane);
        for i in 0..plane {
            for c in 0..3 {
                bytes.push(to_u8(self.data[c * plane + i]));
            }
        }
        image::RgbImage::from_raw(w, h, bytes).ok_or_else(|| "buffer does not match the image size".to_string())
    }
}

/// The largest image [`Image::load`] reads: 8192 x 8192 = 67,108,864 pixels (the `fape`
/// commands' `--max-image-pixels` default).
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 26;

/// Widest sample layout a decoder produces: RGBA of f32, 16 bytes per pixel.
const MAX_DECODED_BYTES_PER_PIXEL: u64 = 16;

/// What a decoder may allocate beyond the pixels (metadata, ICC profiles, line buffers).
const DECODE_SLACK_BYTES: u64 = 16 << 20;

/// The bytes a decoder may allocate for an image of at most `max_pixels` pixels: the pixels in
/// the widest layout plus 16 MiB.
pub fn decode_budget(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(MAX_DECODED_BYTES_PER_PIXEL).saturating_add(DECODE_SLACK_BYTES)
}

/// Decodes the image `reader` holds (read from `path`) as [`Image::load_limited`] says.
fn decode<R: std::io::BufRead + std::io::Seek>(
    path: &Path,
    reader: image::ImageReader<R>,
    max_pixels: u64,
) -> Result<Image> {
    let mut reader = reader.with_guessed_format().map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(file_error(path, "not a PNG, JPEG or TIFF image"));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(decode_budget(max_pixels));
    reader.limits(limits);
    let over = |what: String| {
        file_error(path, format!("{what}, over the limit of {max_pixels} pixels (--max-image-pixels raises it)"))
    };
    let failed = |e: image::ImageError| match e {
        image::ImageError::Limits(e) => over(format!("decoding it needs more memory ({e})")),
        e => file_error(path, format!("cannot decode image: {e}")),
    };
    let decoder = contained(path, || reader.into_decoder().map_err(failed))?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(over(format!("image claims {width}x{height} = {pixels} pixels")));
    }
    if width == 0 || height == 0 {
        return Err(file_error(path, format!("image has zero size ({width}x{height})")));
    }
    let decoded = contained(path, || image::DynamicImage::from_decoder(decoder).map_err(failed))?;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let rgba = decoded.to_rgba32f();
    let plane = width * height;
    let mut data = vec![0.0f32; 3 * plane];
    for (i, px) in rgba.pixels().enumerate() {
        let [r, g, b, a] = px.0;
        if ![r, g, b, a].iter().all(|v| v.is_finite()) {
            return Err(file_error(path, format!("pixel {i} holds a non-finite sample")));
        }
        let a = a.clamp(0.0, 1.0);
        for (c, v) in [r, g, b].into_iter().enumerate() {
            data[c * plane + i] = v.clamp(0.0, 1.0) * a + (1.0 - a);
        }
    }
    Ok(Image { width, height, data })
}

thread_local! {
    /// Set while [`contained`] runs a decoder on this thread: then a panic's message is kept
    /// here (by the hook [`contained`] installs) instead of printed.
    static DECODER_PANIC: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Runs `decode`, a step of a third-party image decoder, turning a panic in it into a
/// [`FapeError::File`] naming `path`: decoders have bugs an input can reach (zune-jpeg 0.5.15
/// unwraps a `None` in its AVX2 IDCT on a 589-byte JPEG the `image` fuzz target found), and a
/// hostile file must not crash the program. The panic is not printed (an error is one line);
/// panics anywhere else still go to the hook that was there before.
fn contained<T>(path: &Path, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = || {
                let payload = info.payload();
                let text =
                    payload.downcast_ref::<&str>().copied().or(payload.downcast_ref::<String>().map(String::as_str));
                let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                format!("{}{at}", text.unwrap_or("a panic")).replace('\n', " ")
            };
            let kept = DECODER_PANIC.with(|slot| match slot.try_borrow_mut().as_deref_mut() {
                Ok(Some(kept)) => {
                    *kept = Some(message());
                    true
                }
                _ => false,
            });
            if !kept {
                previous(info);
            }
        }));
    });
    DECODER_PANIC.with(|slot| *slot.borrow_mut() = Some(None));
    let result = std::panic::catch_unwind(AssertUnwindSafe(decode));
    let message = DECODER_PANIC.with(|slot| slot.borrow_mut().take()).flatten();
    result.unwrap_or_else(|_| {
        let why = message.unwrap_or_else(|| "a panic".into());
        Err(file_error(path, format!("cannot decode image: the decoder failed ({why})")))
    })
}

/// `v` in `[0,1]` as an 8-bit sample (NaN as 0).
fn to_u8(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fape-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn gradient(width: usize, height: usize) -> Image {
        Image::from_fn(width, height, |x, y| {
            [x as f32 / (width - 1) as f32, y as f32 / (height - 1) as f32, ((x + y) % 7) as f32 / 6.0]
        })
    }

    #[test]
    fn png_round_trip_is_exact_to_8_bits() {
        let image = gradient(37, 23);
        let path = scratch("round.png");
        image.save(&path).unwrap();
        let back = Image::load(&path).unwrap();
        assert_eq!((back.width, back.height), (37, 23));
        for (i, (&a, &b)) in image.data.iter().zip(&back.data).enumerate() {
            assert!((a - b).abs() <= 0.5 / 255.0 + 1e-6, "sample {i}: wrote {a}, read {b}");
        }
    }

    #[test]
    fn tiff_and_jpeg_round_trip() {
        let image = gradient(40, 24);
        // TIFF is lossless (8-bit rounding only); JPEG is lossy, and its chroma subsampling
        // smears the blue sawtooth, so it is held to a mean difference.
        for (name, tolerance) in [("round.tif", 0.5 / 255.0 + 1e-6), ("round.jpg", 0.05)] {
            let path = scratch(name);
            image.save(&path).unwrap();
            let back = Image::load(&path).unwrap();
            assert_eq!((back.width, back.height), (40, 24), "{name}");
            let diffs: Vec<f32> = image.data.iter().zip(&back.data).map(|(a, b)| (a - b).abs()).collect();
            let (worst, mean) = (diffs.iter().cloned().fold(0.0f32, f32::max), diffs.iter().sum::<f32>() / 2880.0);
            let measured = if name.ends_with(".tif") { worst } else { mean };
            assert!(measured <= tolerance, "{name}: difference {measured} (worst {worst}, mean {mean})");
        }
        assert!(image.save(&scratch("round.xyz")).is_err());
    }

    #[test]
    fn sixteen_bit_keeps_full_precision() {
        let path = scratch("deep.png");
        let values: Vec<u16> = (0..12u16).map(|i| 1 + i * 5003).collect();
        let buf = image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(2, 2, values.clone()).unwrap();
        buf.save(&path).unwrap();
        let image = Image::load(&path).unwrap();
        for (i, &v) in values.iter().enumerate() {
            let (pixel, c) = (i / 3, i % 3);
            let got = image.data[c * 4 + pixel];
            assert_eq!(got, v as f32 / 65535.0, "sample {i}");
        }
    }

    #[test]
    fn alpha_composites_over_white_and_grey_expands() {
        let path = scratch("alpha.png");
        let buf = image::GrayAlphaImage::from_raw(2, 1, vec![0, 0, 0, 255]).unwrap();
        buf.save(&path).unwrap();
        let image = Image::load(&path).unwrap();
        // Pixel 0 is black but fully transparent: white. Pixel 1 is opaque black.
        assert_eq!(image.data, vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn bad_files_are_typed_errors_naming_the_path() {
        let missing = scratch("missing.png");
        let text = scratch("text.png");
        std::fs::write(&text, "not an image").unwrap();
        let truncated = scratch("truncated.png");
        gradient(64, 64).save(&truncated).unwrap();
        let bytes = std::fs::read(&truncated).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let empty = scratch("empty.png");
        std::fs::write(&empty, b"").unwrap();
        for path in [missing, text, truncated, empty] {
            match Image::load(&path) {
                Err(FapeError::File { path: p, message }) => {
                    assert_eq!(p, path.display().to_string(), "{message}");
                }
                other => panic!("{}: expected a file error, got {other:?}", path.display()),
            }
        }
    }

    #[test]
    fn view_and_grey_have_the_documented_shapes() {
        let image = gradient(5, 3);
        let shape = image.shape();
        let view = image.view(&shape).unwrap();
        assert_eq!(view.shape(), &[1, 3, 3, 5]);
        let grey = image.to_grey();
        assert_eq!(grey.len(), 15);
        let x = 4 + 2 * 5;
        let expected = 0.299 * image.data[x] + 0.587 * image.data[15 + x] + 0.114 * image.data[30 + x];
        assert_eq!(grey[x], expected);
        assert!(Image::new(0, 3, vec![]).is_err());
        assert!(Image::new(2, 2, vec![0.5; 11]).is_err());
        assert!(image.view(&[1, 3, 5, 3]).is_err());
    }
}
