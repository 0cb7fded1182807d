//! Decode and eval preprocessing against Pillow/torchvision references.

use std::path::PathBuf;

use pirclip_checkpoint::npy;
use pirclip_image::{decode_file, eval_resize_crop, preprocess_eval, resize_bicubic, RgbImage};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(p)
}

fn max_diff(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(a.len(), b.len());
    let mut m = 0u8;
    let mut n = 0;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        m = m.max(d);
        n += (d > 0) as usize;
    }
    (m, n)
}

const PARITY: [&str; 4] = [
    "airport_348.jpg",
    "bareland_43.jpg",
    "airport_349.jpg",
    "beach_388.jpg",
];

#[test]
fn jpeg_decode_bit_identical_to_libjpeg_turbo() {
    let want = npy::read(fx("parity/images_decoded_u8.npy")).unwrap();
    let per = 150 * 150 * 3;
    let mut worst = 0;
    for (i, name) in PARITY.iter().enumerate() {
        let img = decode_file(&fx(&format!("parity/images/{name}"))).unwrap();
        assert_eq!((img.width, img.height), (150, 150));
        let (m, n) = max_diff(&img.pixels, &want.bytes[i * per..(i + 1) * per]);
        println!("{name}: decode max |diff| {m}, {n} of {per} values differ");
        worst = worst.max(m);
    }
    let kafka = decode_file(&fx("franz-kafka.jpg")).unwrap();
    let want = npy::read(fx("pil_decoded_franz_kafka_u8.npy")).unwrap();
    let (m, n) = max_diff(&kafka.pixels, &want.bytes);
    println!("franz-kafka.jpg: decode max |diff| {m}, {n} values differ");
    worst = worst.max(m);
    assert_eq!(
        worst, 0,
        "decoder differs from libjpeg-turbo by {worst} levels"
    );
}

#[test]
fn bicubic_resize_is_bit_identical_to_pillow_on_the_same_pixels() {
    // Feed Pillow's own decoded pixels so only the resampler is compared.
    let decoded = npy::read(fx("parity/images_decoded_u8.npy")).unwrap();
    let resized = npy::read(fx("parity/images_resized_u8.npy")).unwrap();
    let (per_in, per_out) = (150 * 150 * 3, 64 * 64 * 3);
    for i in 0..4 {
        let img = RgbImage::new(
            150,
            150,
            decoded.bytes[i * per_in..(i + 1) * per_in].to_vec(),
        );
        let out = eval_resize_crop(&img, 64);
        assert_eq!(
            max_diff(&out.pixels, &resized.bytes[i * per_out..(i + 1) * per_out]),
            (0, 0),
            "image {i}"
        );
    }
    // Upscaling and a non-square source (Resize(224) + CenterCrop(224)).
    let kafka = npy::read(fx("pil_decoded_franz_kafka_u8.npy")).unwrap();
    let img = RgbImage::new(kafka.shape[1], kafka.shape[0], kafka.bytes.clone());
    let want = npy::read(fx("pil_resized_224_u8.npy")).unwrap();
    let per = 224 * 224 * 3;
    assert_eq!(
        max_diff(&eval_resize_crop(&img, 224).pixels, &want.bytes[..per]),
        (0, 0),
        "franz-kafka 224"
    );
    for (j, i) in [(1, 0), (2, 3)] {
        let img = RgbImage::new(
            150,
            150,
            decoded.bytes[i * per_in..(i + 1) * per_in].to_vec(),
        );
        assert_eq!(
            max_diff(
                &eval_resize_crop(&img, 224).pixels,
                &want.bytes[j * per..(j + 1) * per]
            ),
            (0, 0),
            "upscale {i}"
        );
    }
    // Identity when the size already matches.
    let img = RgbImage::new(3, 2, (0..18).collect());
    assert_eq!(resize_bicubic(&img, 3, 2), img);
}

#[test]
fn eval_pixels_match_official_bit_for_bit() {
    let want = npy::read(fx("parity/pixels_eval.npy"))
        .unwrap()
        .to_f32_vec();
    let per = 3 * 64 * 64;
    let mut worst = 0f32;
    for (i, name) in PARITY.iter().enumerate() {
        let img = decode_file(&fx(&format!("parity/images/{name}"))).unwrap();
        let got = preprocess_eval(&img, 64);
        for (a, b) in got.iter().zip(&want[i * per..(i + 1) * per]) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("pixels_eval max |diff| {worst} (one 8-bit level is ~0.015)");
    // 2/255 before normalisation is 2/255/0.26 after.
    assert!(worst <= 1e-6, "{worst}");
}

#[test]
fn normalisation_is_exact_on_pillow_pixels() {
    let resized = npy::read(fx("parity/images_resized_u8.npy")).unwrap();
    let want = npy::read(fx("parity/pixels_eval.npy"))
        .unwrap()
        .to_f32_vec();
    let per_out = 64 * 64 * 3;
    for i in 0..4 {
        let img = RgbImage::new(
            64,
            64,
            resized.bytes[i * per_out..(i + 1) * per_out].to_vec(),
        );
        let got = preprocess_eval(&img, 64);
        let worst = got
            .iter()
            .zip(&want[i * per_out..(i + 1) * per_out])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "image {i}: {worst}");
    }
}

#[test]
fn unreadable_image_error_names_the_file() {
    let dir = std::env::temp_dir().join(format!("pirclip-img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff not really a jpeg").unwrap();
    let msg = decode_file(&bad).unwrap_err().to_string();
    assert!(msg.contains("broken.jpg"), "{msg}");
}
