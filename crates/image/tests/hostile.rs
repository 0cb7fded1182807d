//! Decompression bombs, built from the real fixtures by rewriting their headers: refused by size before any
//! decoder allocates (a 10 KB JPEG claiming 60000×60000 used to allocate 10+ GB and abort).

use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// The JPEG with its SOF frame header claiming `width × height`.
fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut j = fixture("airport_224.jpg");
    let mut at = 2;
    loop {
        assert_eq!(j[at], 0xff, "marker expected at {at}");
        let marker = j[at + 1];
        let len = u16::from_be_bytes([j[at + 2], j[at + 3]]) as usize;
        if (0xc0..=0xc2).contains(&marker) {
            j[at + 5..at + 7].copy_from_slice(&height.to_be_bytes());
            j[at + 7..at + 9].copy_from_slice(&width.to_be_bytes());
            return j;
        }
        at += 2 + len;
    }
}

/// A PNG of the real image's first row whose IHDR (with a correct CRC) claims `width × height`.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
    let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01"; // an empty zlib stream
    png.extend_from_slice(&8u32.to_be_bytes());
    png.extend_from_slice(idat);
    png.extend_from_slice(&crc32fast::hash(idat).to_be_bytes());
    png.extend_from_slice(&0u32.to_be_bytes());
    png.extend_from_slice(b"IEND");
    png.extend_from_slice(&crc32fast::hash(b"IEND").to_be_bytes());
    png
}

#[test]
fn the_unmodified_fixture_decodes() {
    let img = pirclip_image::decode(&jpeg_claiming(224, 224), "x.jpg").unwrap();
    assert_eq!((img.width, img.height), (224, 224));
}

#[test]
fn a_jpeg_claiming_60000_squared_is_refused_by_its_header() {
    let bomb = jpeg_claiming(60000, 60000);
    assert!(bomb.len() < 100_000);
    let msg = pirclip_image::decode(&bomb, "bomb.jpg")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bomb.jpg") && msg.contains("3600000000 pixels"),
        "{msg}"
    );
    assert!(msg.contains("--max-image-pixels"), "{msg}");
}

#[test]
fn a_tall_thin_jpeg_header_within_the_limit_fails_cleanly_on_missing_data() {
    // 1 × 65500 is within the pixel limit; its scan data (for 224×224) cannot fill it.
    let r = pirclip_image::decode(&jpeg_claiming(1, 65500), "thin.jpg");
    if let Ok(img) = r {
        assert_eq!((img.width, img.height), (1, 65500));
    }
}

#[test]
fn a_png_claiming_60000_squared_is_refused_by_its_header() {
    let msg = pirclip_image::decode(&png_claiming(60000, 60000), "bomb.png")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("3600000000 pixels"), "{msg}");
    // Within the limit, the missing pixel data is an ordinary error.
    pirclip_image::decode(&png_claiming(100, 100), "short.png").unwrap_err();
}
