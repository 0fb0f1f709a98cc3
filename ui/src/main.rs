//! `coterie-app`: the Coterie desktop app.

use std::path::PathBuf;

use clap::Parser;
use coterie_ui::{App, Backend, BackendConfig};

/// Coterie: a messenger with no server.
#[derive(Parser, Debug)]
#[command(name = "coterie-app", version)]
struct Args {
    /// Directory holding your profiles (one sub-directory each).
    /// Default: $XDG_DATA_HOME/coterie.
    #[arg(long, env = "COTERIE_PROFILES", value_name = "DIR")]
    profiles: Option<PathBuf>,
    /// Never start Tor, whatever the profile's settings say.
    #[arg(long)]
    no_tor: bool,
    /// Listen on ADDR (IP:PORT) instead of the profile's setting.
    #[arg(long, value_name = "ADDR", value_parser = listen)]
    listen: Option<std::net::SocketAddr>,
    /// Window size, WIDTHxHEIGHT in points.
    #[arg(long, default_value = "960x640", value_parser = size)]
    size: (f32, f32),
}

fn listen(s: &str) -> Result<std::net::SocketAddr, String> {
    transport::parse_socket_addr(s)
        .ok_or_else(|| format!("`{s}` is not IP:PORT (e.g. 192.168.1.20:7474)"))
}

fn size(s: &str) -> Result<(f32, f32), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| format!("`{s}` is not WIDTHxHEIGHT, e.g. 960x640"))?;
    let w: f32 = w.parse().map_err(|_| format!("`{w}` is not a width"))?;
    let h: f32 = h.parse().map_err(|_| format!("`{h}` is not a height"))?;
    Ok((w.clamp(320.0, 8000.0), h.clamp(240.0, 8000.0)))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COTERIE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = BackendConfig {
        base: args.profiles.unwrap_or_else(BackendConfig::default_base),
        kdf: node::store::crypto::KdfParams::recommended(),
        no_tor: args.no_tor,
        no_lan: false,
        listen: args.listen,
    };
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Coterie")
            .with_app_id("coterie")
            .with_inner_size([args.size.0, args.size.1]),
        renderer: eframe::Renderer::Glow,
        ..Default::default()
    };
    let run = eframe::run_native(
        "Coterie",
        options,
        Box::new(move |cc| {
            // A blinking cursor repaints twice a second forever: an idle
            // app should draw nothing.
            cc.egui_ctx
                .all_styles_mut(|s| s.visuals.text_cursor.blink = false);
            let ctx = cc.egui_ctx.clone();
            let backend = Backend::start(cfg, move || ctx.request_repaint());
            Ok(Box::new(App::new(backend)))
        }),
    );
    match run {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "coterie-app: cannot open a window: {e}. Is a display available (DISPLAY or WAYLAND_DISPLAY)?"
            );
            std::process::ExitCode::from(1)
        }
    }
}
