//! The progress ticker: extends the broker's redelivery deadline of every delivery held
//! longer than the interval, so that work waiting behind a slow key is not redelivered.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;

pub(super) async fn tick(sh: Arc<Shared>, every: Duration) {
    loop {
        tokio::select! {
            () = sh.hard_stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = Instant::now();
        let due = sh.state.lock().sched.due_progress(now, every);
        for acker in due {
            if let Err(error) = acker.progress().await {
                tracing::debug!(topic = %sh.p.topic, %error, "progress signal failed");
            }
        }
    }
}
