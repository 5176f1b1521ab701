//! `velo image-cache serve|stop|status`.

use std::process::ExitCode;

use velo_mount::image_cache;
use velo_objects::Store;

use super::Ctx;
use crate::cli::ImageCacheCommand;
use crate::output;

pub fn image_cache(ctx: &Ctx, command: ImageCacheCommand) -> anyhow::Result<ExitCode> {
    let store = Store::open(&ctx.store)?;
    let (running, what) = match command {
        ImageCacheCommand::Serve => {
            image_cache::serve(&store, image_cache::IDLE)?;
            (false, "stopped")
        }
        ImageCacheCommand::Stop => {
            let was = image_cache::stop(&store);
            (false, if was { "stopped" } else { "was not running" })
        }
        ImageCacheCommand::Status => {
            let images = image_cache::status(&store);
            if ctx.json {
                output::json(&serde_json::json!({
                    "running": images.is_some(),
                    "socket": image_cache::socket_path(&store),
                    "images": images.unwrap_or_default(),
                }))?;
            } else {
                match images {
                    Some(list) => {
                        ctx.say(format!("image cache: running, {} images", list.len()));
                        for c in list {
                            ctx.say(format!(
                                "  {}  {} hits; overlays: {} lent, {} idle, {} reused, {} discarded",
                                c.image, c.hits, c.lent, c.idle, c.reused, c.discarded
                            ));
                        }
                    }
                    None => ctx.say("image cache: not running"),
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if ctx.json {
        output::json(&serde_json::json!({
            "running": running,
            "socket": image_cache::socket_path(&store),
        }))?;
    } else {
        ctx.say(format!("image cache: {what}"));
    }
    Ok(ExitCode::SUCCESS)
}
