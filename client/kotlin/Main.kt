// An app of the SDK in Kotlin, through the generated bindings
// (scripts/sdk.sh kotlin), run on a JVM by client/tests/kotlin_sdk.rs
// against a real relay on loopback:
//
//   1. Alice and Bob sign in; Bob registers his device for push.
//   2. Alice presses, feeds a WAV of speech as her microphone (20 ms
//      frames in real time) and releases; Bob hears it decoded through
//      onTalk while she talks and keeps it whole through onClip.
//   3. Alice asks for her data use (a coroutine).
//   4. The relay goes down (asked for on stdout, confirmed on stdin);
//      Alice sends a recorded file; the relay comes back; Bob gets it.
//   5. Carol signs in with an expired token; the relay refuses it and
//      freshToken() gives a new one; she is connected.
//
// Prints `STOP_RELAY` / `START_RELAY` and waits for `stopped` / `started`
// on stdin; ends with one JSON line, exit 0; any surprise exits 1.

import java.io.File
import java.util.concurrent.ConcurrentLinkedQueue
import java.util.concurrent.TimeUnit
import javax.sound.sampled.AudioSystem
import kotlin.system.exitProcess
import kotlinx.coroutines.runBlocking
import uniffi.ptt_client.*

class App(val name: String, private val fresh: String? = null) : ClipListener {
    val clips = ConcurrentLinkedQueue<Clip>()
    val statuses = ConcurrentLinkedQueue<LinkStatus>()
    val sent = ConcurrentLinkedQueue<Pair<String, SendResult>>()
    @Volatile var audioSamples = 0L
    @Volatile var firstAudioAt = 0L
    // The press whose audio is counted (a clip sent later may also be
    // heard live, when the listener is back first).
    @Volatile var hearing: String? = null
    @Volatile var freshAsked = 0

    override fun onClip(clip: Clip): Boolean {
        clips.add(clip)
        return true
    }

    override fun onSent(id: String, result: SendResult) {
        sent.add(id to result)
    }

    override fun onStatus(status: LinkStatus) {
        statuses.add(status)
        System.err.println("$name: $status")
    }

    override fun freshToken(): String? {
        freshAsked += 1
        return fresh
    }

    override fun onTalk(event: Talk) {
        if (event is Talk.Audio && event.clipId == hearing) {
            if (firstAudioAt == 0L) firstAudioAt = System.currentTimeMillis()
            audioSamples += event.pcm.size
        }
    }

    fun connected() = statuses.any { it is LinkStatus.Connected }
}

fun fail(why: String): Nothing {
    System.err.println("kotlin app: $why")
    exitProcess(1)
}

fun waitFor(what: String, secs: Long = 20, ok: () -> Boolean) {
    val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(secs)
    while (!ok()) {
        if (System.nanoTime() > deadline) fail("timed out waiting for $what")
        Thread.sleep(20)
    }
}

fun client(relay: String, ca: String, dir: String, token: String, app: App) =
    PttClient(ClientConfig(relay, ca, dir, token, 16000u, 20u, 25u), app)

/** 16-bit mono samples of a WAV file. */
fun samples(path: String): ShortArray {
    val input = AudioSystem.getAudioInputStream(File(path))
    val f = input.format
    if (f.channels != 1 || f.sampleSizeInBits != 16 || f.sampleRate != 16000f) {
        fail("want 16 kHz 16-bit mono, got $f")
    }
    val bytes = input.readAllBytes()
    val big = f.isBigEndian
    return ShortArray(bytes.size / 2) { i ->
        val (lo, hi) = if (big) bytes[2 * i + 1] to bytes[2 * i] else bytes[2 * i] to bytes[2 * i + 1]
        ((hi.toInt() shl 8) or (lo.toInt() and 0xff)).toShort()
    }
}

fun main(args: Array<String>) {
    if (args.size != 9) fail("usage: RELAY CA DATA ALICE BOB CAROL_EXPIRED CAROL_FRESH WAV OPUS")
    val (relay, ca, data, aliceToken, bobToken) = args
    val (carolExpired, carolFresh, wav, opus) = args.drop(5)
    val stdin = System.`in`.bufferedReader()

    // 1. Sign in; Bob's device registers for push.
    val alice = App("alice")
    val bob = App("bob")
    val a = client(relay, ca, "$data/alice", aliceToken, alice)
    val b = client(relay, ca, "$data/bob", bobToken, bob)
    waitFor("alice and bob connected") { alice.connected() && bob.connected() }
    val push = runBlocking { b.registerPush(PushKind.FCM, "fcm-token-of-bobs-phone", "") }
    if (!push.kept || push.devices != 1u) fail("push registration: $push")

    // 2. A live press from a WAV of speech, in real time.
    val pcm = samples(wav)
    val frame = 320 // 20 ms at 16 kHz
    val id = a.press(TargetKind.USER, "bob")
    bob.hearing = id
    var at = 0
    val start = System.nanoTime()
    while (at < pcm.size) {
        val end = minOf(at + frame, pcm.size)
        a.pcm(pcm.slice(at until end).toList())
        at = end
        val due = start + TimeUnit.MILLISECONDS.toNanos((at / 16).toLong())
        val wait = due - System.nanoTime()
        if (wait > 0) Thread.sleep(wait / 1_000_000, (wait % 1_000_000).toInt())
    }
    val releasedAt = System.currentTimeMillis()
    if (a.release() != id) fail("release gave another id")
    waitFor("bob keeps the press") { bob.clips.any { it.id == id } }
    val heard = bob.clips.first { it.id == id }
    waitFor("alice hears it was accepted") {
        alice.sent.any { it.first == id && it.second is SendResult.Accepted }
    }

    // 3. Data use, as a coroutine.
    val use = runBlocking { a.usage(1u) }
    val up = use.sumOf { it.bytesUp.toLong() }
    if (up <= 0) fail("no bytes up counted: $use")

    // 4. A recorded clip sent while the relay is down.
    println("STOP_RELAY")
    System.out.flush()
    if (stdin.readLine() != "stopped") fail("the relay was not stopped")
    val offline = a.sendFile(TargetKind.USER, "bob", File(opus).readBytes())
    if (a.pending() != 1u) fail("the offline clip is not in the outbox")
    println("START_RELAY")
    System.out.flush()
    if (stdin.readLine() != "started") fail("the relay was not started")
    waitFor("bob gets the clip sent while the relay was down", 40) {
        bob.clips.any { it.id == offline }
    }
    waitFor("the outbox empties") { a.pending() == 0u }

    // 5. An expired token, replaced through freshToken().
    val carol = App("carol", carolFresh)
    val c = client(relay, ca, "$data/carol", carolExpired, carol)
    waitFor("carol connected with a fresh token") { carol.connected() }
    if (carol.freshAsked < 1) fail("freshToken was not asked")

    runBlocking {
        a.stop()
        b.stop()
        c.stop()
    }
    val heardMs = bob.audioSamples / 48
    println(
        "{\"press\":\"$id\",\"press_kept_ms\":${heard.durationMs},\"press_live\":${heard.live}," +
            "\"heard_ms\":$heardMs,\"first_audio_before_release_ms\":${releasedAt - bob.firstAudioAt}," +
            "\"offline\":\"$offline\",\"bytes_up_today\":$up,\"push_devices\":${push.devices}," +
            "\"clips_bob\":${bob.clips.size},\"fresh_asked\":${carol.freshAsked}}"
    )
    exitProcess(0)
}
