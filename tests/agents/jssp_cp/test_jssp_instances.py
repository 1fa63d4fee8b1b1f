"""Instances: Taillard's generator against published facts, the shipped files, both text formats and their errors,
random training instances."""
import numpy as np
import pytest

from agents.jssp_cp.instances import (Instance, benchmark, detect_format, format_orlib, format_taillard,
                                      is_benchmark, load_taillard, parse_instance, random_instance,
                                      random_instance_arrays, random_size, read_instance, taillard_from_seeds,
                                      taillard_generate, taillard_names, write_instance)

# Taillard 1993's trivial lower bound max(longest job, most loaded machine) of ta01..ta80 as published with the seeds.
PUBLISHED_TRIVIAL_LB = [
    977, 942, 921, 911, 940, 889, 935, 963, 982, 911, 1139, 1251, 1178, 1130, 1148, 1181, 1257, 1153, 1202, 1186,
    1217, 1240, 1185, 1271, 1256, 1207, 1331, 1269, 1267, 1212, 1764, 1774, 1729, 1828, 1729, 1777, 1771, 1673,
    1641, 1602, 1830, 1761, 1694, 1787, 1731, 1856, 1690, 1744, 1758, 1674, 2760, 2756, 2717, 2797, 2679, 2781,
    2943, 2885, 2655, 2723, 2868, 2848, 2755, 2691, 2725, 2845, 2812, 2764, 3063, 2995, 5464, 5181, 5552, 5339,
    5392, 5342, 5436, 5394, 5358, 5183]


def test_generator_reproduces_ta01_first_jobs():
    ta01 = taillard_from_seeds("ta01")
    assert ta01.durations[0].tolist() == [94, 66, 10, 53, 26, 15, 65, 82, 10, 27, 93, 92, 96, 70, 83]
    assert ta01.durations[1].tolist() == [74, 31, 88, 51, 57, 78, 8, 7, 91, 79, 18, 51, 18, 99, 33]
    assert (ta01.machines[0] + 1).tolist() == [7, 13, 5, 8, 4, 3, 11, 12, 9, 15, 10, 14, 6, 1, 2]


def test_generator_reproduces_the_papers_4x4_example():
    inst = taillard_generate(4, 4, 1166510396, 164000672)
    assert inst.durations.tolist() == [[54, 34, 61, 2], [9, 15, 89, 70], [38, 19, 28, 87], [95, 34, 7, 29]]
    assert (inst.machines + 1).tolist() == [[3, 1, 4, 2], [4, 1, 2, 3], [1, 2, 3, 4], [1, 3, 2, 4]]


def test_shipped_files_match_the_generator_and_the_published_bounds():
    assert len(taillard_names()) == 80
    for name, published in zip(taillard_names(), PUBLISHED_TRIVIAL_LB):
        inst = load_taillard(name)
        assert inst == taillard_from_seeds(name), name
        assert inst.visits_every_machine_once()
        loads = np.zeros(inst.num_machines, int)
        np.add.at(loads, inst.machines, inst.durations)
        assert max(inst.durations.sum(1).max(), loads.max()) == published, name


def test_benchmark_returns_the_best_known_bounds():
    inst, lb, ub = benchmark("ta01")
    assert (inst.jobs, inst.operations, lb, ub) == (15, 15, 1231, 1231)
    inst, lb, ub = benchmark("ta71")
    assert inst.machines.shape == (100, 20) and lb <= ub
    with pytest.raises(ValueError, match="unknown Taillard instance 'ta81'"):
        benchmark("ta81")


@pytest.mark.parametrize("fmt", ["taillard", "orlib"])
def test_write_then_read_round_trips(tmp_path, fmt):
    inst = random_instance(0, 7, 5)
    path = write_instance(inst, tmp_path / f"x.{fmt}", fmt)
    assert detect_format(path.read_text()) == fmt
    assert read_instance(path) == inst
    assert read_instance(path, fmt) == inst


def test_orlib_reads_a_recirculating_job_and_zero_durations():
    inst = parse_instance("2 2\n0 3 0 0\n1 2 0 4\n")
    assert inst.machines.tolist() == [[0, 0], [1, 0]] and inst.durations.tolist() == [[3, 0], [2, 4]]
    with pytest.raises(ValueError, match="every machine exactly once"):
        format_taillard(inst)


TAILLARD = ("Nb of jobs, Nb of Machines, Time seed, Machine seed, Upper bound, Lower bound\n"
            "  2  3  1  1  10  5\nTimes\n 1 2 3\n 4 5 6\nMachines\n 1 2 3\n 3 2 1\n")


def test_taillard_text_parses():
    inst = parse_instance(TAILLARD)
    assert inst.machines.tolist() == [[0, 1, 2], [2, 1, 0]] and inst.durations.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert inst.metadata == (1, 1, 10, 5)
    assert parse_instance(format_orlib(inst)) == inst


@pytest.mark.parametrize("text, line, message", [
    (TAILLARD.replace(" 1 2 3\n 4", " 1 2\n 4"), 4, "expected 3 values"),
    (TAILLARD.replace(" 4 5 6\n", " 4 -5 6\n"), 5, "durations must be >= 0; got -5"),
    (TAILLARD.replace(" 4 5 6\n", " 4 5.5 6\n"), 5, "must be integers; got '5.5'"),
    (TAILLARD.replace(" 3 2 1\n", " 3 2 4\n"), 8, "machine 4 is out of range 1..3"),
    (TAILLARD.replace(" 3 2 1\n", " 3 2 2\n"), 8, "visit every machine exactly once"),
    (TAILLARD.replace(" 4 5 6\n", ""), 4, "'Times' section must have 2 rows"),
    (TAILLARD + " 1 2 3\n", 9, "'Machines' section must have 2 rows"),
    (TAILLARD.replace("Machines\n", ""), 7, "exactly one 'Machines' section"),
    (TAILLARD.replace("  2  3  1", "  x  3  1"), 2, "must be integers"),
    ("2 2\n0 3 1 4\n1 2 0\n", 3, "expected 2 'machine duration' pairs"),
    ("2 2\n0 3 1 4\n1 2 2 4\n", 3, "machine 2 is out of range 0..1"),
    ("2 2\n0 3 1 4\n1 -2 0 4\n", 3, "durations must be >= 0; got -2"),
    ("2 2\n0 3 1 4\n", 2, "expected 2 job rows"),
    ("2 2\n0 3 1 4\n1 2 0 4\n1 2 0 4\n", 4, "expected 2 job rows"),
    ("2\n0 3 1 4\n", 1, "expected 'jobs machines'"),
    ("\n\n", 1, "the file is empty"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"bad.txt, line {line}: .*{message}") as err:
        read_instance(path)
    assert "\n" not in str(err.value)


def test_instance_rejects_bad_arrays():
    with pytest.raises(ValueError, match="same shape"):
        Instance(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="durations must be >= 0"):
        Instance(np.zeros((1, 1), int), -np.ones((1, 1), int))
    with pytest.raises(ValueError, match="durations must be integers"):
        Instance(np.zeros((1, 1), int), np.ones((1, 1)))


def test_random_instances_are_taillard_like_and_seeded():
    inst = random_instance(3, 30, 20)
    assert inst.machines.shape == (30, 20) and inst.visits_every_machine_once()
    assert 1 <= inst.durations.min() and inst.durations.max() <= 99
    assert random_instance(3, 30, 20) == inst and random_instance(4, 30, 20) != inst
    assert not is_benchmark(inst) and is_benchmark(load_taillard("ta02"))
    sizes = {random_size(s) for s in range(200)}
    assert all(6 <= j <= 30 and 6 <= m <= 20 and m <= j for j, m in sizes) and len(sizes) > 50


def test_jax_random_instances_are_permutations():
    import jax

    machines, durations = jax.vmap(lambda k: random_instance_arrays(k, 6, 6))(jax.random.split(jax.random.key(0), 4))
    assert (np.sort(np.asarray(machines), axis=-1) == np.arange(6)).all()
    assert 1 <= int(durations.min()) and int(durations.max()) <= 99
