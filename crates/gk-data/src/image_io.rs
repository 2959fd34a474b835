//! Image decoding with size limits, and the pixel preprocessing shared by every model:
//! CLIP's resize + centre crop, and the grounding letterbox (resize long side + pad + mask)
//! with either resize filter of [`Resize`]; [`pil_bilinear`] is Pillow's antialiased
//! bilinear `Image.resize` to the bit (TransVG's transforms resize PIL images).

use crate::error::{DataError, Result};
use candle_core::{Device, Tensor};
use gk_box::Letterbox;
use image::{imageops::FilterType, ImageReader, Limits, RgbImage};
use std::path::Path;

/// Largest side and allocation we accept: a small file may claim a huge size.
pub const MAX_SIDE: u32 = 16_384;
pub const MAX_ALLOC: u64 = 512 * 1024 * 1024;

/// Per-channel normalisation constants.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// OpenAI CLIP (`CLIPImageProcessor`).
    pub const CLIP: Normalize = Normalize {
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    };
    /// ImageNet (TransVG, HiVG's data pipeline).
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
}

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_SIDE);
    l.max_image_height = Some(MAX_SIDE);
    l.max_alloc = Some(MAX_ALLOC);
    l
}

/// Decodes an image file to RGB, with the format guessed from its bytes.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_rgb(&bytes).map_err(|source| DataError::Image {
        path: path.to_path_buf(),
        source,
    })
}

/// Decodes image bytes (PNG or JPEG) to RGB under the size limits.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, image::ImageError> {
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    reader.limits(limits());
    Ok(reader.decode()?.to_rgb8())
}

/// `[3, H, W]` f32 tensor of an RGB image, scaled to `[0, 1]` then normalised.
pub fn to_tensor(img: &RgbImage, norm: &Normalize, dev: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = (p[c] as f32 / 255.0 - norm.mean[c]) / norm.std[c];
        }
    }
    Ok(Tensor::from_vec(data, (3, h, w), dev)?)
}

/// CLIPProcessor: resize the shortest side to `size` (bicubic), centre-crop `size x size`.
pub fn clip_resize_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = size as f32 / w.min(h) as f32;
    let (nw, nh) = (
        ((w as f32 * s).round() as u32).max(size),
        ((h as f32 * s).round() as u32).max(size),
    );
    let resized = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
    let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
    image::imageops::crop_imm(&resized, x0, y0, size, size).to_image()
}

/// The resize filter of the letterbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// The `image` crate's triangle filter (groundkit's own models).
    #[default]
    Triangle,
    /// Pillow's `Image.resize(size, BILINEAR)` (TransVG, EpmVG, DUET as published).
    PilBilinear,
}

impl Resize {
    pub fn apply(self, img: &RgbImage, w: u32, h: u32) -> RgbImage {
        match self {
            Resize::Triangle => image::imageops::resize(img, w, h, FilterType::Triangle),
            Resize::PilBilinear => pil_bilinear(img, w, h),
        }
    }
}

/// Pillow's fixed-point coefficient precision for 8-bit images (`PRECISION_BITS`).
const PIL_BITS: u32 = 22;

/// Per output pixel: the first input index, and its fixed-point weights (Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` with the bilinear filter, support 1).
fn pil_coeffs(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i32>)> {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0 times the scale
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (f64::from(xx) + 0.5) * scale;
            // C's (int) truncates toward zero
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    let v = k * f64::from(1u32 << PIL_BITS);
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

fn pil_clip8(v: i32) -> u8 {
    (v >> PIL_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((w, h), Image.BILINEAR)` of an RGB image: antialiased (the filter
/// widens with the downscale factor), horizontal pass then vertical, 8-bit fixed point with
/// the intermediate rounded to `u8`, as `ImagingResample` does.
pub fn pil_bilinear(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    let round = 1i32 << (PIL_BITS - 1);
    let horizontal = if w != iw {
        let cx = pil_coeffs(iw, w);
        let src = img.as_raw();
        let mut out = vec![0u8; (w * ih * 3) as usize];
        for y in 0..ih as usize {
            let row = &src[y * iw as usize * 3..(y + 1) * iw as usize * 3];
            for (x, (x0, k)) in cx.iter().enumerate() {
                for c in 0..3 {
                    let acc = k
                        .iter()
                        .enumerate()
                        .fold(round, |a, (i, &k)| a + i32::from(row[(x0 + i) * 3 + c]) * k);
                    out[(y * w as usize + x) * 3 + c] = pil_clip8(acc);
                }
            }
        }
        RgbImage::from_raw(w, ih, out).expect("w x ih x 3 bytes")
    } else {
        img.clone()
    };
    if h == ih {
        return horizontal;
    }
    let cy = pil_coeffs(ih, h);
    let src = horizontal.as_raw();
    let stride = w as usize * 3;
    let mut out = vec![0u8; (w * h * 3) as usize];
    for (y, (y0, k)) in cy.iter().enumerate() {
        for i in 0..stride {
            let acc = k.iter().enumerate().fold(round, |a, (j, &k)| {
                a + i32::from(src[(y0 + j) * stride + i]) * k
            });
            out[y * stride + i] = pil_clip8(acc);
        }
    }
    RgbImage::from_raw(w, h, out).expect("w x h x 3 bytes")
}

/// A letterboxed image ready for a grounder.
#[derive(Debug, Clone)]
pub struct Letterboxed {
    /// `[3, S, S]`, normalised; padding is 0 after normalisation.
    pub pixels: Tensor,
    /// `[S, S]`, 1 = image, 0 = padding.
    pub mask: Tensor,
    pub frame: Letterbox,
}

/// Resize to `frame`'s size with `resize`, pad to a square at `frame`'s offset.
pub fn letterbox_with(
    img: &RgbImage,
    frame: Letterbox,
    resize: Resize,
    norm: &Normalize,
    dev: &Device,
) -> Result<Letterboxed> {
    let resized = resize.apply(img, frame.width, frame.height);
    let s = frame.side as usize;
    let (px, py) = (frame.pad_x as usize, frame.pad_y as usize);
    let mut data = vec![0f32; 3 * s * s];
    let mut mask = vec![0f32; s * s];
    for (x, y, p) in resized.enumerate_pixels() {
        let (x, y) = (x as usize + px, y as usize + py);
        if x >= s || y >= s {
            continue;
        }
        mask[y * s + x] = 1.0;
        for c in 0..3 {
            data[c * s * s + y * s + x] = (p[c] as f32 / 255.0 - norm.mean[c]) / norm.std[c];
        }
    }
    Ok(Letterboxed {
        pixels: Tensor::from_vec(data, (3, s, s), dev)?,
        mask: Tensor::from_vec(mask, (s, s), dev)?,
        frame,
    })
}

/// The eval transform: centred letterbox.
pub fn letterbox(
    img: &RgbImage,
    side: u32,
    resize: Resize,
    norm: &Normalize,
    dev: &Device,
) -> Result<Letterboxed> {
    let (w, h) = img.dimensions();
    letterbox_with(img, Letterbox::centred(w, h, side), resize, norm, dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageEncoder as _;

    #[test]
    fn not_an_image_is_a_typed_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("gk-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("fake.png");
        std::fs::write(&p, b"this is not a png").unwrap();
        let e = load_rgb(&p).unwrap_err();
        assert!(matches!(e, DataError::Image { .. }));
        assert!(e.to_string().contains("fake.png"), "{e}");
        let e = load_rgb(&dir.join("missing.png")).unwrap_err();
        assert!(matches!(e, DataError::Io { .. }) && e.to_string().contains("missing.png"));
    }

    #[test]
    fn huge_claimed_size_is_rejected() {
        // a PNG header claiming 100000 x 100000 pixels
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&[0u8; 3], 1, 1, image::ExtendedColorType::Rgb8)
            .unwrap();
        // IHDR width/height live at bytes 16..24
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(decode_rgb(&png).is_err());
    }

    #[test]
    fn letterbox_masks_padding() -> Result<()> {
        let img = RgbImage::from_pixel(40, 20, image::Rgb([255, 0, 0]));
        let lb = letterbox(
            &img,
            32,
            Resize::Triangle,
            &Normalize::IMAGENET,
            &Device::Cpu,
        )?;
        assert_eq!(lb.pixels.dims(), &[3, 32, 32]);
        let m = lb.mask.to_vec2::<f32>()?;
        assert_eq!(m[0][0], 0.0); // top padding
        assert_eq!(m[16][0], 1.0); // image row
        assert_eq!(lb.frame.pad_y, 8.0);
        Ok(())
    }
}
