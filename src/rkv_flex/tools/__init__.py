"""What sits on top of the library: the self-check, teacher-forced replay, sampling with shared noise, answer
accuracy, and the bundled model and prompts. The core (``rkv_flex``'s other modules) never imports from here."""
