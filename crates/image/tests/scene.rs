//! GeoTIFF scenes: georeferencing read back as written, band choice and the 16-bit stretch rule, and a
//! header that claims a huge raster refused before anything of its size is allocated.

use pirclip_image::scene::{encode_geotiff, GeoTransform};
use pirclip_image::{decode_scene, GeoRef, RgbImage, SceneOptions};

fn gradient(w: usize, h: usize) -> RgbImage {
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            px.extend([
                (x * 7 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x + y) % 256) as u8,
            ]);
        }
    }
    RgbImage::new(w, h, px)
}

#[test]
fn georeferencing_round_trips_north_up_and_rotated() {
    let img = gradient(40, 30);
    for (transform, crs) in [
        ([500_000.0, 0.5, 0.0, 4_100_000.0, 0.0, -0.5], "EPSG:32633"),
        ([12.5, 1e-5, 2e-6, 41.9, 3e-6, -1e-5], "EPSG:4326"),
    ] {
        let geo = GeoRef {
            transform: GeoTransform(transform),
            crs: Some(crs.into()),
        };
        let bytes = encode_geotiff(&img, Some(&geo)).unwrap();
        let scene = decode_scene(&bytes, "t.tif", &SceneOptions::default()).unwrap();
        assert_eq!(scene.image, img, "8-bit RGB pixels unchanged");
        let back = scene.geo.expect("georeferencing read back");
        assert_eq!(back.crs.as_deref(), Some(crs));
        for (a, b) in back.transform.0.iter().zip(transform) {
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "{transform:?} vs {back:?}"
            );
        }
        // The centre of pixel (10, 20) on the map.
        let (x, y) = back.transform.apply(10.5, 20.5);
        assert!((x - (transform[0] + transform[1] * 10.5 + transform[2] * 20.5)).abs() < 1e-6);
        assert!((y - (transform[3] + transform[4] * 10.5 + transform[5] * 20.5)).abs() < 1e-6);
    }
    // No tags: an image, without a position.
    let plain = encode_geotiff(&img, None).unwrap();
    assert!(decode_scene(&plain, "p.tif", &SceneOptions::default())
        .unwrap()
        .geo
        .is_none());
}

/// A 4-band 16-bit TIFF (stored as RGBA16) whose band b of pixel i is `1000·(b+1) + i`.
fn four_band_u16(w: usize, h: usize) -> Vec<u8> {
    use tiff::encoder::{colortype::RGBA16, TiffEncoder};
    let mut data = Vec::with_capacity(w * h * 4);
    for i in 0..w * h {
        for b in 0..4u16 {
            data.push(1000 * (b + 1) + i as u16);
        }
    }
    let mut out = std::io::Cursor::new(Vec::new());
    TiffEncoder::new(&mut out)
        .unwrap()
        .write_image::<RGBA16>(w as u32, h as u32, &data)
        .unwrap();
    out.into_inner()
}

#[test]
fn sixteen_bit_bands_are_chosen_and_stretched_from_the_2nd_to_98th_percentile() {
    let (w, h) = (10, 10);
    let bytes = four_band_u16(w, h);
    let scene = decode_scene(
        &bytes,
        "b.tif",
        &SceneOptions {
            bands: Some([4, 3, 1]),
        },
    )
    .unwrap();
    // Each band holds base + 0..99: nearest-rank 2nd/98th percentiles are base+1 and base+97.
    let expect = |i: usize| -> u8 {
        let v = i as f64;
        ((v - 1.0) / 96.0 * 255.0).round().clamp(0.0, 255.0) as u8
    };
    for i in [0, 1, 50, 97, 99] {
        let px = &scene.image.pixels[i * 3..i * 3 + 3];
        assert_eq!(px, [expect(i); 3], "pixel {i}");
    }
    // The default for a four-band image is bands 1,2,3, stretched the same way.
    let default = decode_scene(&bytes, "b.tif", &SceneOptions::default()).unwrap();
    assert_eq!(default.image.pixels[50 * 3], expect(50));
    let err = decode_scene(
        &bytes,
        "b.tif",
        &SceneOptions {
            bands: Some([5, 1, 1]),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("band 5") && err.contains("4 band"), "{err}");
}

/// A little-endian TIFF header with one IFD claiming `width`×`height` 16-bit grey and 16 bytes of data.
fn claims(width: u32, height: u32) -> Vec<u8> {
    let mut b = b"II*\0".to_vec();
    b.extend(8u32.to_le_bytes());
    let entries: [(u16, u16, u32); 8] = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 16),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8 + 2 + 8 * 12 + 4),
        (278, 4, height),
        (279, 4, 16),
    ];
    b.extend((entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        b.extend(tag.to_le_bytes());
        b.extend(kind.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        if kind == 3 {
            b.extend((value as u16).to_le_bytes());
            b.extend([0, 0]);
        } else {
            b.extend(value.to_le_bytes());
        }
    }
    b.extend(0u32.to_le_bytes());
    b.extend([7u8; 16]);
    b
}

#[test]
fn a_header_claiming_a_huge_raster_is_refused_before_decoding() {
    let err = decode_scene(
        &claims(100_000, 100_000),
        "huge.tif",
        &SceneOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("over the limit"), "{err}");
    // Within the limit but missing its data: an error, not a panic.
    let err = decode_scene(&claims(300, 200), "short.tif", &SceneOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("short.tif"), "{err}");
}
