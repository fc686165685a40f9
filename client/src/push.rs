//! The device's push registration as the SDK keeps it in its data dir: a
//! stable device id (`device.id`, made once) and the last registration
//! asked for (`push.reg`), sent again on every connection so the relay
//! always has the current token and the user's current channels.

use std::path::Path;

use codec::wire::{PushProvider, PushRegister};

/// Writes `bytes` to `path` whole or not at all (temporary file, sync,
/// rename).
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// This install's device id: 128 random bits in hex, made the first time
/// and kept.
pub fn device_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("device.id");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() == 32 => Ok(s.trim().to_owned()),
        _ => {
            let id: String = (0..16)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            write_whole(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

/// Keeps the registration (`provider`, token, topic: one per line).
pub fn save(dir: &Path, r: &PushRegister) -> std::io::Result<()> {
    let text = format!("{}\n{}\n{}\n", r.provider.name(), r.token, r.topic);
    write_whole(&dir.join("push.reg"), text.as_bytes())
}

/// The registration kept, if any.
pub fn load(dir: &Path) -> Option<PushRegister> {
    let text = std::fs::read_to_string(dir.join("push.reg")).ok()?;
    let mut lines = text.lines();
    let provider = PushProvider::from_name(lines.next()?)?;
    let token = lines.next()?.to_owned();
    let topic = lines.next().unwrap_or_default().to_owned();
    Some(PushRegister {
        provider,
        device_id: device_id(dir).ok()?,
        token,
        topic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registration_and_device_id_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_none());
        let id = device_id(dir.path()).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(device_id(dir.path()).unwrap(), id, "made once");
        let r = PushRegister {
            provider: PushProvider::Apns,
            device_id: id.clone(),
            token: "ab12".into(),
            topic: "com.example.ptt.voip-ptt".into(),
        };
        save(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path()), Some(r));
    }
}
