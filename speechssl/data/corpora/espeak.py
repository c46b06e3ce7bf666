"""A small ctypes binding to eSpeak NG (the library shipped by the ``espeakng-loader`` wheel).

It synthesises text to memory and converts text to phonemes, with no audio device.
eSpeak NG keeps all its state in globals and is not thread-safe: use one engine per *process*
(``get_engine()`` does that and refuses calls from other threads); parallelise with processes.

eSpeak's wave generator also carries state from one utterance to the next (pitch flutter phase,
automatic gain, echo buffer, ``rand()`` for breathy voices), so the same call gives slightly different
samples depending on what was spoken before. ``ESpeakServer`` gives bit-exact output: a lean helper
process that loads eSpeak once, never speaks itself, and answers each request from a freshly forked
copy of itself (needs ``os.fork``; elsewhere it speaks in-process, not bit-exact).

Phones come from ``espeak_TextToPhonemes`` in IPA mode with a space between phonemes; stress marks
(ˈ ˌ) are dropped and the length mark stays attached to its vowel (``ɑː``), so one phone is one
whitespace-free token. The inventory is eSpeak's English IPA set for the voice's accent.

Phone timings come from the synthesis itself: the library is initialised with phoneme events
(``espeakINITIALIZE_PHONEME_EVENTS | espeakINITIALIZE_PHONEME_IPA``), which leave the audio unchanged, and
``synthesize_timed`` returns each phoneme's IPA symbol (stress marks dropped; "" for a pause) with its start
sample. The event holds at most 8 bytes of UTF-8, so a rare long symbol loses its last character. These symbols
may differ a little from ``phonemize``'s (rhotic vowels such as ``ɑːɹ`` are one phoneme in synthesis).

This module imports only the standard library at load time (numpy lazily), so the helper process
stays small and forks fast.
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import threading
from dataclasses import astuple, dataclass

# Values from eSpeak NG's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_PHONEME_IPA = 0x0002  # phoneme events carry IPA symbols instead of eSpeak mnemonics
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PHONEMES_IPA = 0x02
_PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
# Ranges the library accepts (speak_lib.h); values outside are clipped, not passed through.
_LIMITS = {"rate": (80, 450), "volume": (0, 200), "pitch": (0, 100), "range": (0, 100), "wordgap": (0, 100)}
_STRESS = str.maketrans("", "", "ˈˌ")


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """``espeak_EVENT`` of speak_lib.h; ``sample`` counts output samples from the start of the espeak_Synth call."""

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_Event))


class ESpeakError(RuntimeError):
    """eSpeak NG could not be loaded, initialised or asked to do something."""


@dataclass(frozen=True)
class Prosody:
    """eSpeak NG speaking parameters (library units).

    rate: words per minute (80..450); pitch: base pitch 0..100 (50 = the voice's default);
    pitch_range: intonation range 0..100 (0 = monotone); volume: amplitude 0..200 (100 = default);
    word_gap: extra pause between words in units of 10 ms.
    """

    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    volume: int = 100
    word_gap: int = 0


def _library_paths() -> tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ESpeakError(
            "the mini corpus needs eSpeak NG from the 'espeakng-loader' package: pip install 'speechssl[mini]'"
        ) from e
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


class ESpeakNG:
    """One initialised eSpeak NG library in this process.

    Prefer ``get_engine()``; creating a second instance in the same process re-initialises the same
    global library state.
    """

    def __init__(self, library_path: str | None = None, data_path: str | None = None):
        if library_path is None or data_path is None:
            lib_default, data_default = _library_paths()
            library_path = library_path or lib_default
            data_path = data_path or data_default
        try:
            lib = ctypes.CDLL(library_path)
        except OSError as e:
            raise ESpeakError(f"cannot load eSpeak NG library {library_path}: {e}") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        flags = _INITIALIZE_DONT_EXIT | _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_PHONEME_IPA
        sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), flags)
        if sr <= 0:
            raise ESpeakError(f"espeak_Initialize failed (data path {data_path})")
        self._lib = lib
        self.sample_rate: int = sr  # 22050 for the standard voices
        self._chunks: list[bytes] = []
        self._phones: list[tuple[str, int]] = []
        # Keep the ctypes callback object alive as long as the engine: the library holds a raw pointer to it.
        self._callback = _SynthCallback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None
        self.synth_calls = 0  # > 0: the wave generator's carried-over state is no longer pristine
        self.thread = threading.get_ident()

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, num_samples * 2))
        i = 0
        while events:  # an array ended by a LIST_TERMINATED event
            ev = events[i]
            if ev.type == _EVENT_LIST_TERMINATED:
                break
            if ev.type == _EVENT_PHONEME:
                # up to 8 bytes, not NUL-terminated when full: a multi-byte character cut short is dropped
                symbol = bytes(ev.id.string).split(b"\0", 1)[0].decode("utf-8", "ignore").translate(_STRESS)
                self._phones.append((symbol, int(ev.sample)))
            i += 1
        return 0  # 0 = continue synthesis

    def _check_owner(self) -> None:
        if threading.get_ident() != self.thread:
            raise ESpeakError("eSpeak NG is not thread-safe: use the engine only from the thread that created it "
                              "(parallelise with processes)")

    def set_voice(self, voice: str) -> None:
        """Select a voice by name: a language (``en``, ``en-us``) optionally with a variant (``en-us+f3``)."""
        self._check_owner()
        if voice != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ESpeakError(f"unknown eSpeak NG voice {voice!r} (expected e.g. 'en-us', 'en+m3', 'en-us+f2')")
            self._voice = voice

    def set_prosody(self, prosody: Prosody) -> None:
        self._check_owner()
        values = {"rate": prosody.rate, "volume": prosody.volume, "pitch": prosody.pitch,
                  "range": prosody.pitch_range, "wordgap": prosody.word_gap}
        for name, value in values.items():
            lo, hi = _LIMITS[name]
            if self._lib.espeak_SetParameter(_PARAM[name], int(min(hi, max(lo, round(value)))), 0) != 0:
                raise ESpeakError(f"espeak_SetParameter({name}={value}) failed")

    def synthesize_timed(self, text: str, voice: str = "en-us", prosody: Prosody = Prosody(), seed: int = 0
                         ) -> tuple[bytes, list[tuple[str, int]]]:
        """Speak ``text``: (int16 PCM bytes at ``self.sample_rate``, phone events ``[(IPA symbol, start sample)]``).

        A phone lasts until the next one starts (the last one until the end of the audio); "" is a pause.
        """
        self._check_owner()
        if not text.strip():
            raise ValueError("eSpeak NG: empty text")
        self.set_voice(voice)
        self.set_prosody(prosody)
        self._lib.espeak_ng_SetRandSeed(int(seed) & 0x7FFFFFFF)
        data = text.encode("utf-8")
        self._chunks, self._phones = [], []
        self.synth_calls += 1
        err = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise ESpeakError(f"espeak_Synth failed with code {err} for text {text!r}")
        chunks, phones, self._chunks, self._phones = self._chunks, self._phones, [], []
        return b"".join(chunks), phones

    def synthesize(self, text: str, voice: str = "en-us", prosody: Prosody = Prosody(), seed: int = 0):
        """Speak ``text``; returns a numpy int16 array [T] at ``self.sample_rate`` (22050 Hz).

        Not bit-exact across calls in one process (see the module docstring); ``ESpeakServer`` is.
        """
        import numpy as np

        return np.frombuffer(self.synthesize_timed(text, voice, prosody, seed)[0], dtype="<i2").astype(np.int16)

    def phonemize(self, text: str, voice: str = "en-us") -> list[list[str]]:
        """IPA phones per word for ``text`` spoken by ``voice``: ``[["ð", "ə"], ["k", "æ", "t"]]``.

        Stress marks are removed; length marks stay on their vowel.
        """
        self._check_owner()
        self.set_voice(voice)
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_char_p(ctypes.addressof(buf))
        mode = _PHONEMES_IPA | (ord(" ") << 8)  # bits 8..23: separator between phonemes
        words: list[list[str]] = []
        while ptr.value:  # one call per clause; the library advances the pointer
            out = self._lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, mode)
            if out is None:
                break
            # Words are separated by two spaces, phonemes by one.
            for word in out.decode("utf-8").translate(_STRESS).split("  "):
                phones = word.split()
                if phones:
                    words.append(phones)
        return words


_ENGINE: ESpeakNG | None = None
_ENGINE_LOCK = threading.Lock()


def get_engine() -> ESpeakNG:
    """This process's eSpeak NG engine, initialised on first use.

    A forked child keeps using its copy of the parent's engine: in synchronous mode the library runs no
    threads of its own, so the copied state is complete.
    """
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = ESpeakNG()
        return _ENGINE


# ------------------------------------------------------------------------------------------ helper process
# Messages on the pipes: 8-byte header (JSON length, body length, little-endian uint32) + JSON + body.

def _send(f, header: dict, body: bytes = b"") -> None:
    head = json.dumps(header).encode("utf-8")
    f.write(struct.pack("<II", len(head), len(body)) + head + body)
    f.flush()


def _read_exact(f, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        b = f.read(left)
        if not b:
            return None
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def _recv(f) -> tuple[dict, bytes] | None:
    size = _read_exact(f, 8)
    if size is None:
        return None
    nh, nb = struct.unpack("<II", size)
    head, body = _read_exact(f, nh), _read_exact(f, nb) if nb else b""
    if head is None or body is None:
        return None
    return json.loads(head), body


def _answer(engine: ESpeakNG, req: dict) -> tuple[dict, bytes]:
    try:
        raw, phones = engine.synthesize_timed(req["text"], req["voice"], Prosody(*req["prosody"]), req["seed"])
        words = engine.phonemize(req["phone_text"], req["voice"]) if req.get("phone_text") else []
        return {"sr": engine.sample_rate, "words": words, "phones": phones}, raw
    except Exception as e:  # reported to the client, which raises
        return {"error": f"{type(e).__name__}: {e}"}, b""


def serve(stdin=None, stdout=None) -> None:
    """Helper-process loop: answer speak requests until stdin closes, each from a pristine fork."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    engine = ESpeakNG()  # never speaks in this process: every fork starts from the same state
    while (msg := _recv(stdin)) is not None:
        req = msg[0]
        if not hasattr(os, "fork"):
            _send(stdout, *_answer(engine, req))
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: speak once, reply to the server through the private pipe, exit
            try:
                os.close(r)
                with os.fdopen(w, "wb") as f:
                    _send(f, *_answer(engine, req))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            reply = _recv(f)
        _, status = os.waitpid(pid, 0)
        _send(stdout, *(reply or ({"error": f"the eSpeak process died (wait status {status})"}, b"")))


class ESpeakServer:
    """Client of a helper process (``serve``) that gives bit-exact eSpeak output for the same request.

    ``with ESpeakServer() as s: samples, sr, words = s.speak("hello.", "en-us+f2", Prosody(), seed=1)``.
    The helper exits when the client closes or its process ends (stdin EOF).
    """

    def __init__(self):
        _library_paths()  # fail here, with the install hint, if eSpeak is missing
        # Run this file as a script: only the standard library and espeakng-loader get imported there.
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def speak(self, text: str, voice: str, prosody: Prosody = Prosody(), seed: int = 0,
              phone_text: str | None = None):
        """Returns (int16 numpy samples [T], sample rate, IPA phones per word of ``phone_text``)."""
        return self.speak_timed(text, voice, prosody, seed, phone_text)[:3]

    def speak_timed(self, text: str, voice: str, prosody: Prosody = Prosody(), seed: int = 0,
                    phone_text: str | None = None):
        """``speak`` plus the phone events of the synthesis: ``[(IPA symbol or "" for a pause, start sample)]``."""
        import numpy as np

        if self._proc.poll() is not None:
            raise ESpeakError(f"the eSpeak helper process exited with status {self._proc.returncode}")
        _send(self._proc.stdin, {"text": text, "voice": voice, "prosody": list(astuple(prosody)),
                                 "seed": int(seed), "phone_text": phone_text})
        reply = _recv(self._proc.stdout)
        if reply is None:
            raise ESpeakError(f"the eSpeak helper process died while speaking {text!r}")
        header, body = reply
        if "error" in header:
            raise ESpeakError(header["error"])
        phones = [(str(sym), int(at)) for sym, at in header.get("phones", [])]
        return np.frombuffer(body, dtype="<i2").astype(np.int16), header["sr"], header["words"], phones

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout:
            self._proc.stdout.close()

    def __enter__(self) -> ESpeakServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    import signal

    # Ctrl-C reaches the whole process group: let the client side handle it; this helper exits at stdin EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve()
