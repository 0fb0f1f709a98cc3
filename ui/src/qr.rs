//! A QR code painted with egui's painter, described for screen readers.

use egui::{Color32, Rect, Sense, Ui, Vec2, WidgetInfo};

/// Size of one module, in points.
const MODULE: f32 = 4.0;
/// The quiet zone around the code, in modules.
const QUIET: usize = 4;

/// Draws `data` as a QR code; `label` is what a screen reader says.
pub fn show(ui: &mut Ui, data: &str, label: &str) -> egui::Response {
    let code = match qrcode::QrCode::new(data.as_bytes()) {
        Ok(c) => c,
        // Too long for a QR code: the link still works when copied.
        Err(_) => return ui.label("(the link is too long for a QR code; copy it instead)"),
    };
    let w = code.width();
    let colors = code.to_colors();
    let side = (w + 2 * QUIET) as f32 * MODULE;
    let (rect, resp) = ui.allocate_exact_size(Vec2::splat(side), Sense::hover());
    let label = label.to_string();
    resp.widget_info(|| WidgetInfo::labeled(egui::Role::Image, true, &label));
    if ui.is_rect_visible(rect) {
        let p = ui.painter_at(rect);
        p.rect_filled(rect, 0.0, Color32::WHITE);
        for (i, c) in colors.iter().enumerate() {
            if *c == qrcode::Color::Dark {
                let (x, y) = ((i % w + QUIET) as f32, (i / w + QUIET) as f32);
                let min = rect.min + Vec2::new(x, y) * MODULE;
                p.rect_filled(
                    Rect::from_min_size(min, Vec2::splat(MODULE)),
                    0.0,
                    Color32::BLACK,
                );
            }
        }
    }
    resp
}

/// The module matrix of `data` (true = dark), for tests.
pub fn modules(data: &str) -> Option<(usize, Vec<bool>)> {
    let code = qrcode::QrCode::new(data.as_bytes()).ok()?;
    let w = code.width();
    Some((
        w,
        code.to_colors()
            .into_iter()
            .map(|c| c == qrcode::Color::Dark)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invite_link_fits_a_qr_code_with_its_finder_patterns() {
        // An invite link of the length `coterie invite` makes (two addresses).
        let link = format!(
            "xmpp:alice@{}.onion?coterie-invite;v=1;id={};s={};exp=1796080697;addr=tcp:192.168.100.200:7474;addr=quic:192.168.100.200:7474;sig={}",
            "a".repeat(56),
            "b".repeat(26),
            "c".repeat(52),
            "d".repeat(103)
        );
        let (w, m) =
            modules(&link).unwrap_or_else(|| panic!("no QR code for {} bytes", link.len()));
        assert_eq!(m.len(), w * w);
        assert_eq!((w - 17) % 4, 0, "a QR version's width");
        // The top-left finder: a dark 7×7 ring around a light ring and a dark 3×3 core.
        for i in 0..7 {
            assert!(m[i] && m[6 * w + i] && m[i * w] && m[i * w + 6]);
        }
        assert!(!m[w + 1] && m[3 * w + 3]);
    }
}
