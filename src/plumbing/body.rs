//! The one capped reader of outbound response bodies: the body is read chunk by chunk and
//! abandoned as soon as it passes the cap, so a peer announcing or streaming a huge body costs
//! at most the cap (plus one network chunk) of memory.

/// Why a response body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is longer than the cap (announced by `Content-Length` or seen while streaming).
    #[error("response body larger than {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// The peer was too slow (the client's read or total timeout).
    #[error("timed out reading the response body")]
    Timeout,
    /// The connection failed while reading. The message carries no URL.
    #[error("cannot read the response body: {0}")]
    Read(String),
}

impl From<reqwest::Error> for BodyError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else {
            Self::Read(e.without_url().to_string())
        }
    }
}

/// Reads `resp`'s body, failing with [`BodyError::TooLarge`] as soon as it is known to exceed
/// `limit` bytes: at once when `Content-Length` says so, otherwise when the streamed chunks pass
/// it. The rest of the body is never read (dropping the response closes the connection).
pub async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    let announced = resp.content_length();
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = Vec::with_capacity(announced.map_or(0, |n| n as usize).min(limit));
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-shot HTTP server on loopback answering every request with a chunked body of
    /// `total` bytes generated on the fly (or with `Content-Length` when `announce`); counts
    /// the body bytes it managed to write.
    async fn streaming_server(total: u64, announce: bool) -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let head = if announce {
                format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n")
            } else {
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_owned()
            };
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 16 * 1024];
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(chunk.len() as u64) as usize;
                let framed = if announce {
                    chunk[..n].to_vec()
                } else {
                    let mut f = format!("{n:x}\r\n").into_bytes();
                    f.extend_from_slice(&chunk[..n]);
                    f.extend_from_slice(b"\r\n");
                    f
                };
                if sock.write_all(&framed).await.is_err() {
                    return;
                }
                sent += n as u64;
                counter.store(sent, Ordering::Relaxed);
            }
            if !announce {
                let _ = sock.write_all(b"0\r\n\r\n").await;
            }
        });
        (url, written)
    }

    async fn get(url: &str) -> reqwest::Response {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        client.get(url).send().await.unwrap()
    }

    #[tokio::test]
    async fn a_small_body_is_read_whole() {
        let (url, _) = streaming_server(3000, false).await;
        let resp = get(&url).await;
        assert_eq!(read_capped(resp, 4096).await.unwrap().len(), 3000);
    }

    #[tokio::test]
    async fn a_streamed_body_over_the_cap_is_cut_off_while_streaming() {
        let total = 64 * 1024 * 1024;
        let (url, written) = streaming_server(total, false).await;
        let resp = get(&url).await;
        let err = read_capped(resp, 16 * 1024).await.unwrap_err();
        assert!(
            matches!(err, BodyError::TooLarge { limit: 16384 }),
            "{err:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            written.load(Ordering::Relaxed) < total / 4,
            "the reader stopped long before the end"
        );
    }

    #[tokio::test]
    async fn an_announced_length_over_the_cap_is_refused_before_reading() {
        let (url, _) = streaming_server(1024 * 1024, true).await;
        let resp = get(&url).await;
        let err = read_capped(resp, 1000).await.unwrap_err();
        assert!(
            matches!(err, BodyError::TooLarge { limit: 1000 }),
            "{err:?}"
        );
    }
}
