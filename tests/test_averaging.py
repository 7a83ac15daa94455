"""The final model's weight average: which epochs enter it, and the copy into the model."""
import torch

from weakseg.tasks.train.averaging import apply_average, average_window, averages_epoch, weight_average


def test_the_window_is_at_most_a_third_of_the_run():
    assert average_window(10, 2) == 2 and average_window(8, 2) == 2 and average_window(6, 2) == 2
    assert average_window(5, 2) == 1 and average_window(2, 5) == 1  # a short run keeps its last weights
    assert average_window(30, 5) == 5 and average_window(10, 1) == 1
    assert [e for e in range(10) if averages_epoch(e, 10, 2)] == [8, 9]
    assert not any(averages_epoch(e, 10, 1) for e in range(10))


def test_apply_average_copies_the_mean_of_the_updates():
    model = torch.nn.Linear(3, 2)
    average = weight_average(model)
    assert apply_average(model, average) == 0  # nothing averaged yet: the model is left alone
    seen = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model.weight.fill_(value)
        seen.append(value)
        average.update_parameters(model)
    resumed = weight_average(model, average.state_dict())
    assert apply_average(model, resumed) == 3
    torch.testing.assert_close(model.weight, torch.full((2, 3), sum(seen) / 3))
