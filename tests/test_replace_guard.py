"""Fill / Load replace the user's own edits only on a second press; Start refuses a YAML whose replacement was
refused (the browser test clicks through the same in the studio)."""

from studio.ui.replace_guard import check_replace, check_train

FILLED = "preset: demo-image\nlora_rank: 8\n"
EDITED = FILLED + "# my note\n"


def test_the_studios_own_yaml_is_replaced_at_once():
    assert check_replace(FILLED, None, None) == ("", None, True)  # filled, loaded, restored or duplicated
    assert check_replace(FILLED, EDITED, None)[2]  # edits since replaced by the studio
    assert check_replace("", None, None)[2]


def test_edits_are_replaced_on_the_second_press_and_not_trained_in_between():
    message, pending, go = check_replace(EDITED, EDITED, None)
    assert not go and pending == EDITED.strip() and "Press the button again" in message
    assert check_train(EDITED, pending)[1] is False and "Not started" in check_train(EDITED, pending)[0]
    assert check_replace(EDITED, EDITED, pending) == ("", None, True)  # the second press
    assert check_train(EDITED + "# more\n", pending)[1]  # edited again: trained as the user sees it
    assert check_train(EDITED, None)[1]  # saved (no pending refusal)
