//! The phone's audio path at default settings on real speech (an espeak-ng
//! fixture, 9.3 s at 16 kHz): resampling, clean-up, encode, decode and the
//! whole send pipeline. Throughput is in samples of 48 kHz audio, so the
//! real-time factor per core is (elements per second) / 48000.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;

use codec::audio::clean::{CleanConfig, Cleaner};
use codec::audio::decode::decode;
use codec::audio::encode::{EncoderConfig, encode};
use codec::audio::pipeline::{SendConfig, SendPipeline};
use codec::audio::{resample, wav};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn fixture() -> codec::audio::Pcm {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/speech-16k.wav");
    wav::read_file(&path).unwrap()
}

fn audio(c: &mut Criterion) {
    let input = fixture();
    let speech = resample::to_48k_mono(&input).unwrap().samples;
    let n = speech.len() as u64;
    let mut g = c.benchmark_group("audio");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n));

    g.bench_function("resample_16k_to_48k", |b| {
        b.iter(|| resample::to_48k_mono(black_box(&input)).unwrap())
    });
    g.bench_function("clean_default", |b| {
        b.iter(|| {
            let mut s = speech.clone();
            Cleaner::new(CleanConfig::default())
                .unwrap()
                .process(&mut s)
                .unwrap()
        })
    });
    g.bench_function("voice_detection_only", |b| {
        b.iter(|| {
            let mut s = speech.clone();
            Cleaner::new(CleanConfig::off())
                .unwrap()
                .process(&mut s)
                .unwrap()
        })
    });
    for complexity in [5u8, 10] {
        let cfg = EncoderConfig {
            complexity,
            ..EncoderConfig::default()
        };
        g.bench_function(format!("encode_16k_20ms_c{complexity}"), |b| {
            b.iter(|| encode(black_box(&speech), 16_000, &cfg).unwrap())
        });
    }
    let clip = encode(&speech, 16_000, &EncoderConfig::default()).unwrap();
    g.bench_function("decode", |b| b.iter(|| decode(black_box(&clip)).unwrap()));
    let pipeline = SendPipeline::new(SendConfig::default()).unwrap();
    g.bench_function("send_pipeline_default", |b| {
        b.iter(|| pipeline.run(black_box(&input)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, audio);
criterion_main!(benches);
