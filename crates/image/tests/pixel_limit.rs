//! The pixel limit is process-wide (like Pillow's `Image.MAX_IMAGE_PIXELS`), so this test has a binary
//! of its own.

#[test]
fn the_pixel_limit_can_be_lowered_and_raised() {
    let jpeg = std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/airport_224.jpg"),
    )
    .unwrap();
    assert_eq!(
        pirclip_image::max_pixels(),
        pirclip_image::DEFAULT_MAX_PIXELS
    );
    pirclip_image::set_max_pixels(224 * 224 - 1);
    let msg = pirclip_image::decode(&jpeg, "a.jpg")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("50176 pixels is over the limit of 50175"),
        "{msg}"
    );
    pirclip_image::set_max_pixels(224 * 224);
    pirclip_image::decode(&jpeg, "a.jpg").unwrap();
}
