//! Self-test of the Synapse harness: two federating homeservers, a call room
//! joined over federation, call.member state visible across servers, and an
//! OpenID token validated at the issuing server's federation port.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::support::matrix_client::CALL_MEMBER;
use crate::support::synapse::{heavy_lock, start_pair};

#[tokio::test]
async fn federating_pair_call_member_and_openid() -> Result<()> {
    let _heavy = heavy_lock();
    let t0 = Instant::now();
    let (mut hs1, mut hs2) = start_pair(Vec::new()).await?;
    eprintln!("pair started in {:.1}s", t0.elapsed().as_secs_f64());

    let alice = hs1.register("alice", false).await?;
    let bob = hs2.register("bob", false).await?;
    ensure!(alice.user_id == format!("@alice:{}", hs1.server_name));
    ensure!(bob.whoami().await?["user_id"] == bob.user_id.as_str());

    let room = alice.create_call_room(&[&bob.user_id]).await?;
    bob.wait_for_invite(&room, Duration::from_secs(30))
        .await
        .context("invite over federation")?;
    bob.join(&room, &[&hs1.server_name]).await?;
    alice
        .wait_for_membership(&room, &bob.user_id, "join", Duration::from_secs(30))
        .await?;

    let state_key = alice.call_member_state_key();
    ensure!(state_key == format!("_@alice:{}_{}_m.call", hs1.server_name, alice.device_id));
    let content = json!({
        "application": "m.call",
        "call_id": "",
        "scope": "m.room",
        "device_id": alice.device_id,
        "expires": 14_400_000,
        "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
        "foci_preferred": [],
    });
    alice
        .send_state(&room, CALL_MEMBER, &state_key, content)
        .await?;
    let seen = bob
        .wait_for_state(
            &room,
            CALL_MEMBER,
            &state_key,
            Duration::from_secs(30),
            |c| c["application"] == "m.call",
        )
        .await?;
    ensure!(seen["device_id"] == alice.device_id.as_str());

    // Bob (power 0) may send call.member too thanks to the override.
    bob.send_state(
        &room,
        CALL_MEMBER,
        &bob.call_member_state_key(),
        json!({"application": "m.call", "call_id": "", "scope": "m.room", "device_id": bob.device_id}),
    )
    .await?;

    let token = bob.openid_token().await?;
    ensure!(
        token["matrix_server_name"] == hs2.server_name.as_str(),
        "{token}"
    );
    let info = hs2
        .openid_userinfo(token["access_token"].as_str().context("no access_token")?)
        .await?;
    ensure!(info["sub"] == bob.user_id.as_str(), "userinfo: {info}");
    // The token is only valid at the issuing server.
    ensure!(hs1
        .openid_userinfo(token["access_token"].as_str().unwrap())
        .await
        .is_err());

    // Restart keeps identity, data and tokens.
    let t = Instant::now();
    hs2.restart().await?;
    eprintln!("hs2 restarted in {:.1}s", t.elapsed().as_secs_f64());
    ensure!(bob.whoami().await?["user_id"] == bob.user_id.as_str());

    let t = Instant::now();
    hs1.stop().await;
    hs2.stop().await;
    eprintln!("pair stopped in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}
