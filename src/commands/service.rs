//! `velo service status|stop`: velo-mountd as its clients see it.

use std::process::ExitCode;

use super::Ctx;
use crate::cli::ServiceCommand;
use crate::output;

pub fn service(ctx: &Ctx, command: ServiceCommand) -> anyhow::Result<ExitCode> {
    let socket = velo_project::client::socket_path(ctx.socket.as_deref());
    match command {
        ServiceCommand::Status => {
            let mut client = match velo_project::client::Client::connect_with_usage(&socket) {
                Ok(c) => c,
                Err(e) => {
                    if ctx.json {
                        output::json(&serde_json::json!({
                            "running": false,
                            "socket": socket,
                            "error": e.to_string(),
                        }))?;
                    } else {
                        ctx.say(format!("velo-mountd: not running ({e})"));
                    }
                    return Ok(ExitCode::from(3));
                }
            };
            let hello = client.hello().clone();
            let images = if rustix::process::geteuid().is_root() {
                client.status()?
            } else {
                Vec::new()
            };
            client.done();
            if ctx.json {
                output::json(&serde_json::json!({
                    "running": true,
                    "socket": socket,
                    "store": hello.store,
                    "uid": hello.uid,
                    "verity": hello.verity,
                    "quota": hello.quota,
                    "used": hello.used,
                    "images": images,
                }))?;
            } else {
                ctx.say(format!(
                    "velo-mountd: running at {}, store {}, verity {}",
                    socket.display(),
                    hello.store.display(),
                    hello.verity
                ));
                let quota = hello.quota.map_or("no quota".to_owned(), |q| {
                    format!("quota {}", output::bytes(q))
                });
                ctx.say(format!(
                    "  you (uid {}): your refs hold {} ({quota})",
                    hello.uid,
                    output::bytes(hello.used.unwrap_or(0))
                ));
                for c in images {
                    ctx.say(format!(
                        "  {}  {} hits; overlays: {} lent, {} idle, {} retired, {} reused, {} discarded",
                        c.image, c.hits, c.lent, c.idle, c.retired, c.reused, c.discarded
                    ));
                }
            }
        }
        ServiceCommand::Stop => {
            velo_mount::privilege::require_root("velo service stop")?;
            let stopped = match velo_project::client::Client::connect(&socket) {
                Ok(c) => {
                    c.stop()?;
                    true
                }
                Err(_) => false,
            };
            if ctx.json {
                output::json(&serde_json::json!({ "stopped": stopped, "socket": socket }))?;
            } else if stopped {
                ctx.say("velo-mountd: stopped");
            } else {
                ctx.say("velo-mountd: was not running");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
