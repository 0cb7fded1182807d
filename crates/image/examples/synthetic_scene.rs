//! Writes a synthetic three-band 16-bit GeoTIFF of any size without holding it, for the memory
//! benchmarks of `index build --tile` and `serve` (bench/hostile.sh):
//! `cargo run --release -p pirclip-image --example synthetic_scene -- 20000 20000 scene.tif`

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, w, h, out] = &args[..] else {
        eprintln!("usage: synthetic_scene WIDTH HEIGHT OUT.tif");
        std::process::exit(2);
    };
    let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
    let geo = pirclip_image::GeoRef {
        transform: pirclip_image::scene::GeoTransform([
            500_000.0,
            0.6,
            0.0,
            4_100_000.0,
            0.0,
            -0.6,
        ]),
        crs: Some("EPSG:32633".into()),
    };
    // Fields, roads and noise in 12-bit reflectance-like values.
    pirclip_image::scene::write_geotiff_u16(
        std::path::Path::new(out),
        w,
        h,
        3,
        Some(&geo),
        |x, y, b| {
            let field = ((x / 300 + y / 300) % 5) as u16 * 400;
            let road = if x % 997 < 12 || y % 1231 < 12 {
                1500
            } else {
                0
            };
            let noise =
                ((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ b * 97) % 200) as u16;
            300 + field + road + noise + b as u16 * 150
        },
    )
}
